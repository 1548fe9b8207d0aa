//! `sd`: the command-line front end. Argument parsing, a progress bar and PNG files; all the
//! work is the library's pipeline.
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use stable_diffusion::image_io::{self, Image};
use stable_diffusion::lora::{LoraCache, LoraWeight};
use stable_diffusion::pipeline::{
    Control, FastModes, GenerateParams, LoadOptions, MicroConditioning, PromptSyntax, Seamless,
    StableDiffusion, StepInfo, VaeTiling, WeightKernels,
};
use stable_diffusion::schedulers::{a1111_sampler_name, PredictionType};
use stable_diffusion::weights::single_file::ModelOverrides;
use stable_diffusion::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(Parser)]
#[command(name = "sd", version, about = "Stable Diffusion on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Txt2img(CommonArgs),
    /// Redraw an image following a prompt.
    Img2img {
        #[command(flatten)]
        common: CommonArgs,
        /// The image to start from (PNG or JPEG; resized to --width/--height if given).
        #[arg(long)]
        init: PathBuf,
        /// How much the image may change, in [0, 1] (default: the model family's, as diffusers:
        /// 0.8, SDXL 0.3).
        #[arg(long)]
        strength: Option<f64>,
    },
    /// Repaint the white region of a mask.
    Inpaint {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long)]
        init: PathBuf,
        /// White = repaint, black = keep.
        #[arg(long)]
        mask: PathBuf,
        /// How much the masked region may change, in [0, 1] (default: the model family's, as
        /// diffusers: 1.0, SDXL 0.9999).
        #[arg(long)]
        strength: Option<f64>,
        /// Copy the original pixels back outside the mask.
        #[arg(long)]
        paste_back: bool,
    },
    /// Train the tiny shapes model from scratch (VAE, CLIP, UNet) and export it.
    Train(TrainArgs),
    /// Measure prompt adherence of a model with the analytic shape checker.
    Eval(EvalArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Checkpoints and intermediate files; an interrupted run resumes from here.
    #[arg(long, default_value = "out/train")]
    work_dir: PathBuf,
    /// Where the trained model is written (diffusers layout).
    #[arg(long, default_value = "models/tiny")]
    model_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start over instead of resuming from the checkpoints in --work-dir.
    #[arg(long)]
    fresh: bool,
    /// `full` (the shipped model) or `tiny` (a seconds-long smoke run).
    #[arg(long, default_value = "full")]
    recipe: String,
    /// Override a recipe value, e.g. `--set unet_steps=500` (repeatable; for experiments).
    #[arg(long = "set")]
    set: Vec<String>,
    /// Stop after a stage: tokenizer, vae or clip (for experiments).
    #[arg(long)]
    stop_after: Option<String>,
    /// Export the UNet checkpoint as it stands, without training (for experiments).
    #[arg(long)]
    export_only: bool,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long, default_value = "models/tiny")]
    model: PathBuf,
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Held-out prompts (each also run with the empty prompt).
    #[arg(long, default_value_t = 216)]
    images: usize,
    /// Images for each of: training combinations, img2img, inpainting.
    #[arg(long, default_value_t = 108)]
    other_images: usize,
    /// img2img strength of the recolouring test.
    #[arg(long, default_value_t = 0.7)]
    strength: f64,
    /// Write a contact sheet of held-out generations to this PNG.
    #[arg(long)]
    sheet: Option<PathBuf>,
    #[arg(long)]
    threads: Option<i32>,
    #[command(flatten)]
    fast: FastArgs,
    #[arg(long)]
    quiet: bool,
}

fn train(a: &TrainArgs) -> Result<()> {
    use stable_diffusion::train::{train_all, Recipe, TrainOptions};
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let mut recipe = match a.recipe.as_str() {
        "full" => Recipe::full(),
        "tiny" => Recipe::tiny(),
        other => {
            return Err(Error::invalid(format!(
                "--recipe `{other}`: use full or tiny"
            )))
        }
    };
    for assignment in &a.set {
        recipe.set(assignment)?;
    }
    let summary = train_all(&TrainOptions {
        work_dir: a.work_dir.clone(),
        model_dir: a.model_dir.clone(),
        seed: a.seed,
        recipe,
        fresh: a.fresh,
        progress: !a.quiet,
        stop_after: a.stop_after.clone(),
        export_only: a.export_only,
    })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    Ok(())
}

fn eval(a: &EvalArgs) -> Result<()> {
    use stable_diffusion::train::eval::{evaluate, EvalOptions};
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let sd = StableDiffusion::load(&a.model, &LoadOptions::default())?;
    let options = EvalOptions {
        guidance: a.guidance,
        steps: a.steps,
        seed: a.seed,
        images: a.images,
        other_images: a.other_images,
        img2img_strength: a.strength,
        sheet: a.sheet.clone(),
        progress: !a.quiet,
        fast: a.fast.modes(),
    };
    let report = evaluate(&sd, &options)?;
    report.print(&options);
    Ok(())
}

/// What the editing subcommands add to the common options.
#[derive(Default)]
struct Edit {
    init: Option<PathBuf>,
    mask: Option<PathBuf>,
    strength: Option<f64>,
    paste_back: bool,
}

/// A size written `WIDTHxHEIGHT`, as `(height, width)` (the order of diffusers' SDXL sizes).
fn parse_seamless(s: &str) -> std::result::Result<Seamless, String> {
    Seamless::parse(s).ok_or_else(|| format!("`{s}`: use x, y or xy"))
}

fn parse_size(s: &str) -> std::result::Result<(i64, i64), String> {
    let (w, h) = parse_pair(s, 'x')?;
    Ok((h, w))
}

/// A corner written `X,Y`, as `(top, left)` (diffusers' `crops_coords_top_left`).
fn parse_corner(s: &str) -> std::result::Result<(i64, i64), String> {
    let (x, y) = parse_pair(s, ',')?;
    Ok((y, x))
}

fn parse_pair(s: &str, sep: char) -> std::result::Result<(i64, i64), String> {
    let (a, b) = s
        .split_once(sep)
        .ok_or_else(|| format!("`{s}`: expected two integers separated by `{sep}`"))?;
    let number = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|e| format!("`{s}`: `{v}` is not an integer ({e})"))
    };
    Ok((number(a)?, number(b)?))
}

#[derive(Args)]
struct CommonArgs {
    /// Model: a diffusers folder, a single .safetensors / .ckpt file or a TorchScript export;
    /// the default is the model this repository trains and ships.
    #[arg(long, default_value = "models/tiny")]
    model: PathBuf,
    #[arg(long, short)]
    prompt: String,
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,
    /// SDXL: the second text encoder's prompt (default: --prompt).
    #[arg(long)]
    prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt (default: --negative-prompt).
    #[arg(long)]
    negative_prompt_2: Option<String>,
    /// How prompts are read: a1111 (attention weights `(word:1.2)`, `[word]`, `BREAK`,
    /// prompts longer than 75 tokens in chunks) or plain (the text as it is, cut at 77 tokens,
    /// as diffusers).
    #[arg(long, value_enum, default_value = "a1111")]
    prompt_syntax: SyntaxArg,
    /// A LoRA to apply, PATH_OR_NAME[:WEIGHT]: a .safetensors file, or the name of one in
    /// --lora-dir; the weight is 1 by default and may be negative. Repeatable.
    #[arg(long = "lora", value_name = "PATH_OR_NAME[:WEIGHT]")]
    loras: Vec<String>,
    /// The folder where --lora names and the prompt's <lora:NAME:WEIGHT> tags find
    /// NAME.safetensors.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// A folder of textual-inversion embeddings (A1111 .pt / .safetensors, diffusers
    /// learned_embeds, SDXL clip_l / clip_g), each used in prompts by its file name.
    #[arg(long)]
    embeddings_dir: Option<PathBuf>,
    /// SDXL micro-conditioning: the size the image is said to come from, WIDTHxHEIGHT
    /// (default: the output size).
    #[arg(long, value_parser = parse_size)]
    original_size: Option<(i64, i64)>,
    /// SDXL micro-conditioning: the crop's top-left corner, X,Y in pixels (default 0,0).
    #[arg(long, value_parser = parse_corner)]
    crop: Option<(i64, i64)>,
    /// SDXL micro-conditioning: the target size, WIDTHxHEIGHT (default: the output size).
    #[arg(long, value_parser = parse_size)]
    target_size: Option<(i64, i64)>,
    /// SDXL refiner: the aesthetic score the image is conditioned on (diffusers' 6.0).
    #[arg(long, default_value_t = 6.0)]
    aesthetic_score: f64,
    /// SDXL refiner: the aesthetic score of the unconditional pass (diffusers' 2.5).
    #[arg(long, default_value_t = 2.5)]
    negative_aesthetic_score: f64,
    /// SDXL: a refiner model that takes over the base model's latents for the last part of
    /// the schedule (the ensemble of experts; the two share the steps).
    #[arg(long)]
    refiner: Option<PathBuf>,
    /// With --refiner: the fraction of the schedule where the base hands over, in (0, 1).
    #[arg(long, default_value_t = 0.8)]
    refiner_start: f64,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Pulls the guided prediction's spread back toward the conditional one's, 0..=1 (CFG
    /// rescale; 0.7 is the usual value for v-prediction models).
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (multiple of 8); the model's native size if omitted.
    #[arg(long)]
    width: Option<i64>,
    #[arg(long)]
    height: Option<i64>,
    /// Scheduler (e.g. ddim, ddpm, or a diffusers class name); the model's own if omitted.
    #[arg(long)]
    scheduler: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// Overrides the model's prediction type: epsilon, v_prediction or sample (single files
    /// are otherwise detected: SD 2.x 768 checkpoints are v_prediction).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Single files: a diffusers folder whose configs and tokenizer replace the detected ones.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Single files: render the EMA copy of the UNet (`model_ema.*`) when the file has one;
    /// without it the non-EMA weights are used, as diffusers, A1111 and ComfyUI do.
    #[arg(long)]
    ema: bool,
    /// Output PNG; with --batch N > 1, files are numbered (out-1.png, out-2.png, ...).
    #[arg(long, short, default_value = "out.png")]
    out: PathBuf,
    /// Copy the weights into memory instead of using a diffusers folder's files in place
    /// (the default maps them copy-on-write; the files must then not change while running).
    #[arg(long)]
    copy_weights: bool,
    /// Run float32 on the CPU with libtorch's plain kernels. The default packs weights once
    /// into oneDNN's layout for SD 1.x/2.x (faster there) and keeps the plain kernels for
    /// SDXL (packing its weights costs more than it saves); the two agree up to rounding.
    #[arg(long, conflicts_with = "packed_weights")]
    plain_weights: bool,
    /// Pack float32 weights into oneDNN's layout on the CPU whatever the family (see
    /// --plain-weights).
    #[arg(long)]
    packed_weights: bool,
    /// Seamless tiling: x, y or xy, the axes along which the image wraps around so that it
    /// tiles without a seam (every convolution pads circularly along them).
    #[arg(long, value_parser = parse_seamless)]
    seamless: Option<Seamless>,
    /// Decode (and encode an init image) in overlapping VAE tiles whenever the image is
    /// larger than a tile. Without it, tiling starts above 1536x1536 pixels.
    #[arg(long, conflicts_with = "no_vae_tiling")]
    vae_tiling: bool,
    /// Never decode in VAE tiles, however large the image.
    #[arg(long)]
    no_vae_tiling: bool,
    /// The VAE tile's side in pixels (a multiple of 32 for SD, at least 64); the VAE's
    /// sample_size by default (512 for SD 1.x).
    #[arg(long)]
    vae_tile_size: Option<i64>,
    /// A tiny autoencoder (TAESD / TAESDXL: a diffusers AutoencoderTiny folder or a
    /// .safetensors file) that decodes the final images instead of the VAE: much faster,
    /// slightly less detailed.
    #[arg(long)]
    tiny_vae: Option<PathBuf>,
    #[command(flatten)]
    fast: FastArgs,
    /// CPU threads to compute with (default: the physical cores); fewer leave room for other
    /// programs, such as a game.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SyntaxArg {
    A1111,
    Plain,
}

/// The opt-in fast modes; each trades some fidelity for speed (measured in the README).
#[derive(Args, Clone, Copy)]
struct FastArgs {
    /// Step caching (DeepCache): a full UNet pass every N calls, the others reuse its deep
    /// features (3 is about twice as fast). 0 or 1 = off.
    #[arg(long, default_value_t = 0)]
    step_cache: usize,
    /// Step caching: the skip connection the cached features enter at (0 = fastest; larger
    /// recomputes more and stays closer to the exact image).
    #[arg(long, default_value_t = 0)]
    step_cache_branch: usize,
    /// Token merging (ToMe): fraction of self-attention tokens merged at the finest
    /// resolution with attention, 0..=0.75 (0 = off, 0.5 usual); pays from 512x512 up.
    #[arg(long, default_value_t = 0.0)]
    token_merging: f64,
    /// The UNet's linear layers in dynamic int8 (fp32 on the CPU only).
    #[arg(long)]
    int8_linear: bool,
}

impl FastArgs {
    fn modes(&self) -> FastModes {
        FastModes {
            cache_interval: self.step_cache,
            cache_branch: self.step_cache_branch,
            token_merging: self.token_merging,
            int8_linear: self.int8_linear,
        }
    }
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        "mps" => Ok(Device::Mps),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| Error::invalid(format!("--device `{s}`: use cpu, cuda, cuda:N or mps"))),
    }
}

fn parse_dtype(s: &str) -> Result<Kind> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "f32" | "float32" => Ok(Kind::Float),
        "fp16" | "f16" | "float16" | "half" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        _ => Err(Error::invalid(format!(
            "--dtype `{s}`: use fp32, fp16 or bf16"
        ))),
    }
}

fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (1..=n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// What PNG info says about the model and the LoRAs of a run.
struct RunInfo<'a> {
    scheduler: &'a str,
    width: u32,
    height: u32,
    model: &'a str,
    /// A1111's `Model hash` (single files only).
    model_hash: Option<String>,
    /// `--lora` LoRAs as the `<lora:NAME:W>` tags that A1111 would read them from.
    tags: String,
    /// Each LoRA's name and short hash (A1111's `Lora hashes`).
    lora_hashes: Vec<(String, String)>,
}

/// A value of A1111's settings line, quoted as A1111 quotes it when it holds `,`, `:` or a
/// line break (a JSON string).
fn a1111_quote(text: &str) -> String {
    if text.contains([',', ':', '\n']) {
        serde_json::Value::from(text).to_string()
    } else {
        text.to_string()
    }
}

/// A1111's `parameters` text: prompt, negative prompt, then the settings line.
fn a1111_parameters(a: &CommonArgs, run: &RunInfo) -> String {
    let RunInfo {
        scheduler,
        width,
        height,
        model,
        ..
    } = run;
    let mut s = format!("{}{}", a.prompt, run.tags);
    if let Some(n) = &a.negative_prompt {
        s.push_str(&format!("\nNegative prompt: {n}"));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {scheduler}, CFG scale: {}, Seed: {}, Size: {width}x{height}",
        a.steps, a.guidance, a.seed
    ));
    if let Some(hash) = &run.model_hash {
        s.push_str(&format!(", Model hash: {hash}"));
    }
    s.push_str(&format!(", Model: {}", a1111_quote(model)));
    if a.clip_skip > 0 {
        s.push_str(&format!(", Clip skip: {}", a.clip_skip + 1));
    }
    if let Some(refiner) = &a.refiner {
        // A1111's own keys for its SDXL refiner.
        let name = refiner
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or("refiner");
        s.push_str(&format!(
            ", Refiner: {name}, Refiner switch at: {}",
            a.refiner_start
        ));
    }
    if a.batch > 1 {
        s.push_str(&format!(", Batch size: {}", a.batch));
    }
    if a.fast.token_merging > 0.0 {
        s.push_str(&format!(", Token merging ratio: {}", a.fast.token_merging));
    }
    if a.fast.int8_linear {
        s.push_str(", Int8 linear: on");
    }
    if a.fast.step_cache > 1 {
        s.push_str(&format!(
            ", Step cache: {} (branch {})",
            a.fast.step_cache, a.fast.step_cache_branch
        ));
    }
    if !run.lora_hashes.is_empty() {
        let list: Vec<String> = run
            .lora_hashes
            .iter()
            .map(|(name, hash)| format!("{}: {hash}", name.replace([':', ','], "")))
            .collect();
        s.push_str(&format!(", Lora hashes: {}", a1111_quote(&list.join(", "))));
    }
    s
}

/// A `--lora PATH_OR_NAME[:WEIGHT]` argument, read.
fn lora_arg(spec: &str, dir: Option<&Path>) -> Result<LoraWeight> {
    let weighted = spec
        .rsplit_once(':')
        .and_then(|(what, w)| Some((what, w.trim().parse::<f64>().ok()?)));
    let (what, weight) = weighted.unwrap_or((spec, 1.0));
    let lora = LoraCache::default()
        .path_or_name(what, dir)
        .map_err(|e| match e {
            Error::InvalidArgument(m) => Error::invalid(format!("--lora {spec}: {m}")),
            other => other,
        })?;
    Ok(LoraWeight::new(lora, weight))
}

/// The folder of `--out` must exist before minutes are spent generating into it.
fn check_out_folder(out: &Path) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::invalid(format!(
            "--out {}: the folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    Ok(())
}

fn run(a: &CommonArgs, edit: Edit) -> Result<()> {
    check_out_folder(&a.out)?;
    let options = LoadOptions {
        device: parse_device(&a.device)?,
        kind: parse_dtype(&a.dtype)?,
        copy_weights: a.copy_weights,
        weight_kernels: match (a.plain_weights, a.packed_weights) {
            (true, _) => WeightKernels::Plain,
            (_, true) => WeightKernels::Packed,
            _ => WeightKernels::Auto,
        },
        lora_dir: a.lora_dir.clone(),
        embeddings_dir: a.embeddings_dir.clone(),
        tiny_vae: a.tiny_vae.clone(),
        progress: None,
        num_threads: a.threads,
    };
    let init_image = edit.init.as_deref().map(Image::load).transpose()?;
    let mask = edit.mask.as_deref().map(Image::load).transpose()?;
    let prediction_type = match a.prediction_type.as_deref() {
        None => None,
        Some(p) => Some(PredictionType::parse(p).ok_or_else(|| {
            Error::invalid(format!(
                "--prediction-type `{p}`: use one of {}",
                PredictionType::NAMES.join(", ")
            ))
        })?),
    };
    let overrides = ModelOverrides {
        prediction_type,
        config_dir: a.config.clone(),
        use_ema: a.ema,
    };
    let sd = StableDiffusion::load_with(&a.model, &options, &overrides)?;
    for why in sd.unused_embeddings() {
        eprintln!("warning: embedding not used: {why}");
    }
    let refiner = match &a.refiner {
        Some(path) => {
            stable_diffusion::pipeline::check_denoising_fraction(
                "--refiner-start",
                a.refiner_start,
            )?;
            Some(StableDiffusion::load(path, &options)?)
        }
        None => None,
    };
    let params = GenerateParams {
        init_image,
        mask,
        strength: edit.strength,
        paste_back: edit.paste_back,
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        guidance_rescale: a.guidance_rescale,
        seed: a.seed,
        width: a.width,
        height: a.height,
        batch: a.batch,
        scheduler: a.scheduler.clone(),
        clip_skip: a.clip_skip,
        eta: a.eta,
        fast: a.fast.modes(),
        prompt_2: a.prompt_2.clone(),
        negative_prompt_2: a.negative_prompt_2.clone(),
        micro: MicroConditioning {
            original_size: a.original_size,
            crops_coords_top_left: a.crop.unwrap_or((0, 0)),
            target_size: a.target_size,
            aesthetic_score: a.aesthetic_score,
            negative_aesthetic_score: a.negative_aesthetic_score,
            ..Default::default()
        },
        prompt_syntax: match a.prompt_syntax {
            SyntaxArg::A1111 => PromptSyntax::A1111,
            SyntaxArg::Plain => PromptSyntax::Plain,
        },
        loras: a
            .loras
            .iter()
            .map(|spec| lora_arg(spec, a.lora_dir.as_deref()))
            .collect::<Result<_>>()?,
        lora_dir: None,
        seamless: a.seamless.unwrap_or_default(),
        vae_tiling: match (a.vae_tiling, a.no_vae_tiling) {
            (true, _) => VaeTiling::On,
            (_, true) => VaeTiling::Off,
            _ => VaeTiling::Auto,
        },
        vae_tile_size: a.vae_tile_size,
        tiny_vae_decode: a.tiny_vae.is_some(),
    };
    // A1111's sampler name where it has one (its PNG-info readers know those), else the
    // scheduler as it was asked for or configured.
    let scheduler_name = match a1111_sampler_name(a.scheduler.as_deref(), &sd.scheduler_config)? {
        Some((name, false)) => name.to_string(),
        Some((name, true)) => format!("{name}, Schedule type: Karras"),
        None => a
            .scheduler
            .clone()
            .or_else(|| sd.scheduler_config.class_name.clone())
            .unwrap_or_else(|| "default".into()),
    };
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut on_step = |info: &StepInfo| {
        bar.set_length(info.total as u64);
        bar.set_position(info.step as u64);
        bar.set_message(format!("t={}", info.timestep));
        Control::Continue
    };
    let images = match &refiner {
        Some(refiner) => sd.generate_with_refiner(
            refiner,
            &params,
            a.refiner_start,
            Some(&mut on_step),
            &|| false,
        )?,
        None => sd.generate(&params, Some(&mut on_step))?,
    };
    bar.finish_and_clear();
    // A1111 names a checkpoint file without its extension; a folder keeps its whole name.
    let model_name = if a.model.is_file() {
        a.model.file_stem()
    } else {
        a.model.file_name()
    };
    let model_name = model_name.and_then(|s| s.to_str()).unwrap_or("model");
    let model_hash = match stable_diffusion::hashes::model_hash(&a.model) {
        Ok(hash) => hash,
        Err(e) => {
            eprintln!("warning: no Model hash in the PNG info: {e}");
            None
        }
    };
    let mut lora_hashes: Vec<(String, String)> = Vec::new();
    for (name, w) in sd.requested_loras(&params)? {
        if lora_hashes.iter().any(|(n, _)| *n == name) {
            continue;
        }
        // A hash that cannot be read costs its entry in the PNG info, never the image.
        match w.lora.short_hash() {
            Ok(hash) => lora_hashes.push((name, hash)),
            Err(e) => eprintln!("warning: no hash for LoRA {name} in the PNG info: {e}"),
        }
    }
    let tags: String = params
        .loras
        .iter()
        .map(|w| format!(" <lora:{}:{}>", w.lora.name(), w.unet))
        .collect();
    let run = RunInfo {
        scheduler: &scheduler_name,
        width: images.width(),
        height: images.height(),
        model: model_name,
        model_hash,
        tags,
        lora_hashes,
    };
    let mut text = a1111_parameters(a, &run);
    if params.init_image.is_some() {
        // The strength that ran, the model family's default included.
        text.push_str(&format!(", Denoising strength: {}", sd.strength(&params)));
    }
    let batch = images.len();
    for (i, (rgb, path)) in images
        .to_rgb8()?
        .iter()
        .zip(output_paths(&a.out, batch))
        .enumerate()
    {
        // Our batch draws its noise together: image i is this command with the whole batch,
        // which A1111's readers see as its batch size and position.
        let text = if batch > 1 {
            format!("{text}, Batch pos: {i}")
        } else {
            text.clone()
        };
        // A text entry that cannot be stored as given costs a warning, never the image.
        let warnings = image_io::write_png(
            &path,
            rgb,
            images.width(),
            images.height(),
            &[("parameters", &text)],
        )?;
        for w in warnings {
            eprintln!("warning: {}: {w}", path.display());
        }
        println!("{}", path.display());
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Txt2img(a) => run(a, Edit::default()),
        Command::Img2img {
            common,
            init,
            strength,
        } => run(
            common,
            Edit {
                init: Some(init.clone()),
                strength: *strength,
                ..Default::default()
            },
        ),
        Command::Inpaint {
            common,
            init,
            mask,
            strength,
            paste_back,
        } => run(
            common,
            Edit {
                init: Some(init.clone()),
                mask: Some(mask.clone()),
                strength: *strength,
                paste_back: *paste_back,
            },
        ),
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
