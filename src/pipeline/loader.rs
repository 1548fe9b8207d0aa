//! Loading a model: a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`) or a single-file checkpoint in the original CompVis / A1111
//! layout (`.safetensors` or `.ckpt`), told apart by content, or a TorchScript export folder
//! (`manifest.json` from `tools/export_torchscript.py`).
use super::{SdxlText, StableDiffusion};
use crate::limits::check_component_size;
use crate::models::blocks::{count_parameters, pack_weights};
use crate::models::tiny_vae::{infer_single_file, TinyVaeLayout, TinyVaeParts};
use crate::models::torchscript::{self, TorchScriptParts};
use crate::models::traits::{Autoencoder, TextEncoder};
use crate::models::vae::UpcastVae;
use crate::models::{
    AutoencoderKL, AutoencoderTiny, ClipTextConfig, ClipTextTransformer, TinyVaeConfig,
    UNet2DConditionModel, UNetConfig, VaeConfig,
};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::weights::progress::{self, LoadProgressHook};
use crate::weights::safetensors_file::kind_of;
use crate::weights::single_file::{
    detect_format, Checkpoint, ComponentSource, Family, Layout, ModelFormat, ModelOverrides,
    SdxlPipelineFlags, SingleFileConfigs,
};
use crate::weights::{load_into_from, load_into_mapped, MappingOwner, WeightSet};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype the weights are held and run in (fp32 by default; fp16 on CUDA; bf16 on CPU).
    /// One exception: in bf16 on the CPU, a text encoder stored in float32 and used in place
    /// (not `copy_weights`) runs in float32 from its file and hands on bf16; it then needs no
    /// resident copy between calls.
    pub kind: Kind,
    /// Copy every weight into memory of our own. By default (false) a diffusers folder's
    /// weights that are stored in `kind` are used in place from a private copy-on-write map of
    /// their file when the model runs on the CPU: loading reads only the headers, the file's
    /// pages serve as the weights, and nothing is written back. The cost of the default: the
    /// file must stay as it is while the model lives (truncating it under a running model
    /// faults the process, and rewriting it changes the weights it reads, as with any
    /// memory-mapped weights; the pages of a part that is idle are let go between calls and
    /// read back from the file, [`super::StableDiffusion::release_idle_weights`]).
    pub copy_weights: bool,
    /// Which kernels float32 models run with on the CPU (see [`WeightKernels`]).
    pub weight_kernels: WeightKernels,
    /// The folder a prompt's `<lora:NAME:W>` tags find `NAME.safetensors` in (a call may
    /// give its own, [`super::GenerateParams::lora_dir`]).
    pub lora_dir: Option<PathBuf>,
    /// A folder of textual-inversion embeddings, each used in prompts by its file's name
    /// (see [`crate::embeddings`]); files that are not embeddings are skipped, with a warning
    /// at the first call.
    pub embeddings_dir: Option<PathBuf>,
    /// A tiny autoencoder (see [`crate::models::tiny_vae`]) for full-size previews and, when a
    /// call asks ([`super::GenerateParams::tiny_vae_decode`]), the final decode.
    pub tiny_vae: Option<PathBuf>,
    /// Told how far the load has come after every tensor, and able to cancel it.
    pub progress: Option<LoadProgressHook>,
    /// CPU threads this pipeline's calls compute with (libtorch's intra-op threads, set on
    /// the calling thread at the start of each call); `None`: the process default (the
    /// physical cores). On a machine shared with a game, fewer threads can run faster.
    pub num_threads: Option<usize>,
}

/// Which kernels a float32 model runs with on the CPU. The two round differently (within
/// 1e-5 of each other); for given load options a pipeline always uses the same ones, so its
/// images depend on the call's arguments only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightKernels {
    /// The faster of the two for the model's family, as measured with `make bench`: packed for
    /// SD 1.x/2.x, plain for SDXL (and plain for a text encoder used in place from its file,
    /// which then need not stay resident between prompts). Packing an SDXL UNet's 922 linear
    /// layers takes some 23 s at the first step on a 2-core AVX2 machine and its steps ran no faster packed (24.4 s
    /// against 22.6 s at 512x512), while an SD 1.5-size UNet packs in a few seconds and then
    /// steps faster (0.80x of diffusers' step at 256x256 against 0.97x plain).
    #[default]
    Auto,
    /// Each linear and convolution layer packs its weight once into oneDNN's blocked layout the
    /// first time it runs on an input no larger than the weight, and works from that copy (the
    /// dense weight is let go): libtorch's plain convolution reorders its weight on every call,
    /// which on a small CPU is a large part of a step.
    Packed,
    /// libtorch's plain kernels throughout.
    Plain,
}

impl WeightKernels {
    /// Whether the layers of a model of this family pack their weights.
    pub(crate) fn packs(self, sdxl: bool) -> bool {
        match self {
            Self::Auto => !sdxl,
            Self::Packed => true,
            Self::Plain => false,
        }
    }

    /// Whether a text encoder packs its weights. Auto leaves one whose weights are used in
    /// place from the file on the plain kernels: packed, its linear layers would stay in
    /// memory of their own (325 MiB for SD 1.5) through every denoising loop, while used in
    /// place they leave once the prompt is encoded
    /// ([`super::StableDiffusion::release_idle_weights`]). That costs a prompt pair about
    /// 30 ms of paging back in and 10-15 % in the kernels (a probe of 12 pairs per run, 3
    /// runs each); encoding the pair as one batch (`encode_prompt_pair`) more than makes up.
    pub(crate) fn packs_text_encoder(self, sdxl: bool, in_place: bool) -> bool {
        match self {
            Self::Auto => !sdxl && !in_place,
            other => other.packs(sdxl),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            copy_weights: false,
            weight_kernels: WeightKernels::Auto,
            lora_dir: None,
            embeddings_dir: None,
            tiny_vae: None,
            progress: None,
            num_threads: None,
        }
    }
}

/// Where each part of a diffusers model folder is.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
}

impl ModelFiles {
    pub fn new(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::invalid(format!(
                "model folder {} does not exist",
                root.display()
            )));
        }
        let index = root.join("model_index.json");
        if index.is_file() {
            let json: serde_json::Value = crate::models::config::read_json(&index)?;
            let class = json
                .get("_class_name")
                .and_then(|c| c.as_str())
                .unwrap_or("");
            let sdxl = class.starts_with("StableDiffusionXL");
            if !sdxl
                && (class.contains("XL")
                    || class.contains("Flux")
                    || class.contains("StableDiffusion3"))
            {
                return Err(Error::Unsupported(format!(
                    "{class} models (SD 1.x / 2.x and SDXL pipelines are supported)"
                )));
            }
        }
        // SDXL's refiner has only the second text encoder.
        let text = if root.join("text_encoder_2").is_dir() && !root.join("text_encoder").is_dir() {
            "text_encoder_2"
        } else {
            "text_encoder"
        };
        for part in ["unet", "vae", text] {
            if !root.join(part).is_dir() {
                return Err(Error::bad_model(format!(
                    "{} has no {part}/ folder: not a diffusers Stable Diffusion folder",
                    root.display()
                )));
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn part(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A boolean of `model_index.json` (SDXL's `force_zeros_for_empty_prompt`,
    /// `requires_aesthetics_score`), `default` when the file or the key is absent.
    fn index_flag(&self, key: &str, default: bool) -> Result<bool> {
        let index = self.root.join("model_index.json");
        if !index.is_file() {
            return Ok(default);
        }
        let json: serde_json::Value = crate::models::config::read_json(&index)?;
        match json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::bad_model(format!("{}: {key} is {v}, not a boolean", index.display()))
            }),
        }
    }
}

/// A variable store whose variables are created directly in `kind` on `device`, so that a
/// half-precision model never exists in fp32 first.
fn var_store(device: Device, kind: Kind) -> VarStore {
    let mut vs = VarStore::new(device);
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    vs
}

/// Builds one component of a diffusers folder with `build` and fills it from the weights in
/// `dir` (`{stem}.safetensors` or its variants), in place from the file's map unless
/// `options.copy_weights`; the maps used are added to `mappings`. The size its config
/// describes is checked against the limits and the weight files first, so a config cannot
/// make us allocate more than the files could fill.
fn load_component<T>(
    what: &str,
    dir: &Path,
    stem: &str,
    options: &LoadOptions,
    build: impl Fn(tch::nn::Path) -> Result<T>,
    keys_of: impl Fn(&str) -> Vec<String>,
    mappings: &mut Vec<MappingOwner>,
) -> Result<T> {
    let weights = WeightSet::find_in_dir(dir, stem)?;
    progress::component(what)?;
    let parameters = count_parameters(&build)?;
    check_component_size(what, parameters, weights.total_bytes(), &weights.describe())?;
    let mut vs = var_store(options.device, options.kind);
    let model = build(vs.root())?;
    mappings.extend(load_into_mapped(
        &weights,
        &vs,
        keys_of,
        !options.copy_weights,
    )?);
    vs.freeze();
    Ok(model)
}

/// The options a text encoder in `dir` is loaded with. In a bf16 pipeline on the CPU, an
/// encoder whose weights are stored in float32 and used in place stays in float32 and runs
/// from its file's pages, its outputs cast to bf16 ([`ClipTextTransformer::with_output_kind`]).
/// Those pages go after each encode (and layer by layer within one, see
/// [`crate::models::clip::release_layers_as_they_run`]), where a bf16 copy would stay on the
/// heap beside the loop (0.23 GiB for SD 1.5's encoder); and on CPUs without fast bf16
/// kernels float32 is also the faster of the two ([`crate::models::bf16_cpu`]).
fn text_encoder_options(dir: &Path, options: &LoadOptions) -> LoadOptions {
    // Every floating-point tensor float32; integer buffers (`position_ids`) are not weights.
    let stored_float32 = || {
        WeightSet::find_in_dir(dir, "model").is_ok_and(|weights| {
            weights.files().iter().all(|f| {
                f.names().all(|n| {
                    !matches!(
                        f.info(n).and_then(|i| kind_of(i.dtype)),
                        Some(Kind::Half | Kind::BFloat16 | Kind::Double) | None
                    )
                })
            })
        })
    };
    let mut text = options.clone();
    if options.kind == Kind::BFloat16
        && options.device == Device::Cpu
        && !options.copy_weights
        && stored_float32()
    {
        text.kind = Kind::Float;
    }
    text
}

/// The type a VAE is held in: float32 for an SDXL pipeline in float16 when its config asks for
/// it (`force_upcast`, as diffusers' SDXL pipelines upcast it; bfloat16 has float32's range and
/// needs no upcast), else the pipeline's.
pub(crate) fn vae_kind(kind: Kind, sdxl: bool, config: &VaeConfig) -> Kind {
    if sdxl && kind == Kind::Half && config.force_upcast {
        Kind::Float
    } else {
        kind
    }
}

/// The VAE keeps libtorch's plain kernels even where the other parts pack their weights: it
/// runs once per image, mostly on large activations, and packing its weights cost more in the
/// one decode of a txt2img call than it saved there (`make bench`).
fn build_vae(vs: tch::nn::Path, config: &VaeConfig) -> Result<AutoencoderKL> {
    let _plain = pack_weights(false);
    AutoencoderKL::new(vs, config)
}

/// The bytes of the weight files a load of `path` reads (a single file's size, the weights of
/// a folder's parts), for progress; 0 when they cannot be found (the load itself then says
/// why).
fn weight_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    let parts = [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        (".", "diffusion_pytorch_model"),
    ];
    parts
        .iter()
        .filter_map(|(dir, stem)| WeightSet::find_in_dir(&path.join(dir), stem).ok())
        .fold(0u64, |a, w| a.saturating_add(w.total_bytes()))
}

/// Loads a tiny autoencoder: a diffusers `AutoencoderTiny` folder (`config.json` and
/// `diffusion_pytorch_model.safetensors`) or one `.safetensors` file, whose layout and sizes
/// are read from its tensors. Its weights are copied (it is small).
pub fn load_tiny_vae(path: &Path, options: &LoadOptions) -> Result<AutoencoderTiny> {
    let _skip_init = crate::models::blocks::skip_random_init();
    let _plain = pack_weights(false);
    let what = format!("tiny autoencoder {}", path.display());
    let (weights, config, layout, parts) = if path.is_dir() {
        let config = TinyVaeConfig::from_file(&path.join("config.json"))?;
        let weights = WeightSet::find_in_dir(path, "diffusion_pytorch_model")?;
        let both = TinyVaeParts {
            encoder: true,
            decoder: true,
        };
        (weights, config, TinyVaeLayout::Diffusers, both)
    } else if path.is_file() {
        let weights = WeightSet::open(&[path.to_path_buf()])?;
        let (layout, config, parts) = infer_single_file(&weights.shapes())
            .map_err(|e| Error::bad_model(format!("{}: {e}", path.display())))?;
        (weights, config, layout, parts)
    } else {
        return Err(Error::invalid(format!(
            "tiny autoencoder {} not found",
            path.display()
        )));
    };
    let build = |vs: tch::nn::Path| AutoencoderTiny::new(vs, &config, parts);
    let parameters = count_parameters(build)?;
    check_component_size(
        &what,
        parameters,
        weights.total_bytes(),
        &weights.describe(),
    )?;
    let vs = var_store(options.device, options.kind);
    let model = build(vs.root())?;
    progress::component("tiny autoencoder")?;
    load_into_mapped(&weights, &vs, |name| vec![layout.key_of(name)], false)?;
    Ok(model)
}

/// The dtypes a model may be loaded in.
fn check_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::Half | Kind::BFloat16 => Ok(()),
        other => Err(Error::invalid(format!(
            "dtype {other:?}: use fp32, fp16 or bf16"
        ))),
    }
}

/// Loads a diffusers `AutoencoderKL` folder (`config.json` and `diffusion_pytorch_model.*`,
/// the `vae/` of a model folder) alone, its weights copied, for decoding or encoding without
/// a pipeline ([`super::vae_decode_with`], [`super::vae_encode_with`]).
pub fn load_vae(dir: &Path, options: &LoadOptions) -> Result<AutoencoderKL> {
    check_kind(options.kind)?;
    crate::runtime::use_threads(options.num_threads)?;
    let _skip_init = crate::models::blocks::skip_random_init();
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let copied = LoadOptions {
        copy_weights: true,
        ..options.clone()
    };
    let mut mappings = Vec::new();
    let vae = load_component(
        "VAE",
        dir,
        "diffusion_pytorch_model",
        &copied,
        |vs| build_vae(vs, &config),
        vae_keys,
        &mut mappings,
    )?;
    // Copied weights hold no mapping of the file.
    debug_assert!(mappings.is_empty());
    Ok(vae)
}

/// diffusers before 0.14 named the VAE's attention `query/key/value/proj_attn`.
fn vae_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_string()];
    for (new, old) in [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ] {
        if name.contains(new) {
            keys.push(name.replace(new, old));
        }
    }
    keys
}

fn same_key(name: &str) -> Vec<String> {
    vec![name.to_string()]
}

/// transformers 4 saves `CLIPTextModel` under `text_model.`, transformers 5 without it.
fn text_encoder_keys(name: &str) -> Vec<String> {
    let mut keys = vec![name.to_string()];
    if let Some(bare) = name.strip_prefix("text_model.") {
        keys.push(bare.to_string());
    }
    keys
}

impl StableDiffusion {
    /// Loads a model from a diffusers folder, a single `.safetensors` or a `.ckpt` (the format
    /// is detected from the content).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        Self::load_with(path, options, &ModelOverrides::default())
    }

    /// As [`StableDiffusion::load`], with the choices of [`ModelOverrides`].
    pub fn load_with(
        path: &Path,
        options: &LoadOptions,
        overrides: &ModelOverrides,
    ) -> Result<Self> {
        let bytes = || weight_bytes(path);
        Self::load_by(options, overrides, bytes, || match detect_format(path)? {
            ModelFormat::DiffusersFolder if torchscript::is_export_folder(path) => {
                Self::load_torchscript(path, options)
            }
            ModelFormat::DiffusersFolder => Self::load_folder(path, options),
            ModelFormat::Safetensors | ModelFormat::Ckpt => {
                Self::load_checkpoint(Checkpoint::open(path)?, options, overrides)
            }
        })
    }

    /// As [`StableDiffusion::load_with`], from a single-file checkpoint (`.safetensors` or
    /// `.ckpt`) held in memory, as an engine packs it into its own archive; `name` stands for
    /// it in messages. `data` is only read during the call (every tensor is copied), with the
    /// same checks as a file.
    pub fn load_from_memory(
        name: &str,
        data: &[u8],
        options: &LoadOptions,
        overrides: &ModelOverrides,
    ) -> Result<Self> {
        Self::load_by(
            options,
            overrides,
            || data.len() as u64,
            || {
                // SAFETY: the checkpoint is dropped inside `load_checkpoint`, within this call,
                // while `data` is borrowed; the model holds copies of its tensors.
                let ckpt = unsafe { Checkpoint::from_bytes(name, data)? };
                Self::load_checkpoint(ckpt, options, overrides)
            },
        )
    }

    /// What every load does around `load` (the model's own loading): checks, the process
    /// settings, progress over `bytes()` bytes, then the overrides, embeddings and tiny
    /// autoencoder.
    fn load_by(
        options: &LoadOptions,
        overrides: &ModelOverrides,
        bytes: impl FnOnce() -> u64,
        load: impl FnOnce() -> Result<Self>,
    ) -> Result<Self> {
        check_kind(options.kind)?;
        crate::runtime::tune_allocator();
        crate::runtime::use_threads(options.num_threads)?;
        let _skip_init = crate::models::blocks::skip_random_init();
        let bytes_total = match &options.progress {
            Some(_) => bytes().saturating_add(options.tiny_vae.as_deref().map_or(0, weight_bytes)),
            None => 0,
        };
        let _progress = progress::install(options.progress.clone(), bytes_total);
        let mut sd = load()?;
        if let Some(p) = overrides.prediction_type {
            sd.scheduler_config.prediction_type = Some(p);
        }
        if let Some(dir) = &options.embeddings_dir {
            sd.set_embeddings(crate::embeddings::Embeddings::from_dir(dir)?);
        }
        if let Some(tiny) = &options.tiny_vae {
            sd.set_tiny_vae(Some(load_tiny_vae(tiny, options)?))?;
        }
        sd.num_threads = options.num_threads;
        progress::done()?;
        Ok(sd)
    }

    /// Loads a diffusers-layout Stable Diffusion folder. Loading maps the pages of every
    /// weight used in place (`SafetensorsFile::populate`), so that each file is read into the
    /// page cache once and in order; each part then lets them go as soon as it is loaded (and
    /// again whenever its work in a call is done), so that none is resident before it runs:
    /// a call runs the text encoders first, and beside a UNet still resident from the load
    /// they made an SDXL call's peak (12.43 GiB at 512x512; the loop's is 10.9 GiB). Paging
    /// back in from the page cache costs about 20 ms per 470 MiB.
    fn load_folder(root: &Path, options: &LoadOptions) -> Result<Self> {
        let files = ModelFiles::new(root)?;
        let mut mappings = Vec::new();

        // SDXL's second encoder; without a first one (the refiner) it is the only encoder.
        let second_dir = files.part("text_encoder_2");
        let _pack = pack_weights(options.weight_kernels.packs(second_dir.is_dir()));
        let second = if second_dir.is_dir() {
            let config = ClipTextConfig::from_file(&second_dir.join("config.json"))?;
            if !config.has_projection() {
                return Err(Error::bad_model(format!(
                    "{}: SDXL's second text encoder must be a CLIPTextModelWithProjection \
                     (its pooled output conditions the UNet)",
                    second_dir.display()
                )));
            }
            let encoder = load_component(
                "second text encoder",
                &second_dir,
                "model",
                &text_encoder_options(&second_dir, options),
                |vs| ClipTextTransformer::new(vs, &config),
                text_encoder_keys,
                &mut mappings,
            )?
            .with_output_kind(options.kind);
            encoder.release_mapped_weights();
            let tokenizer_dir = files.part("tokenizer_2");
            if !tokenizer_dir.is_dir() {
                return Err(Error::bad_model(format!(
                    "{} has text_encoder_2/ but no tokenizer_2/",
                    root.display()
                )));
            }
            Some((ClipTokenizer::from_dir(&tokenizer_dir)?, encoder))
        } else {
            None
        };

        let text_dir = files.part("text_encoder");
        let (tokenizer, text_encoder, second) = match second {
            Some(only) if !text_dir.is_dir() => (only.0, only.1, None),
            second => {
                let tokenizer_dir = files.part("tokenizer");
                let tokenizer = if tokenizer_dir.is_dir() {
                    ClipTokenizer::from_dir(&tokenizer_dir)?
                } else {
                    ClipTokenizer::standard()?
                };
                let text_config = ClipTextConfig::from_file(&text_dir.join("config.json"))?;
                let _text_pack = pack_weights(
                    options
                        .weight_kernels
                        .packs_text_encoder(second.is_some(), !options.copy_weights),
                );
                let text_encoder = load_component(
                    "text encoder",
                    &text_dir,
                    "model",
                    &text_encoder_options(&text_dir, options),
                    |vs| ClipTextTransformer::new(vs, &text_config),
                    text_encoder_keys,
                    &mut mappings,
                )?
                .with_output_kind(options.kind);
                text_encoder.release_mapped_weights();
                (tokenizer, text_encoder, second)
            }
        };
        let refiner = !text_dir.is_dir();

        let unet_dir = files.part("unet");
        let unet_config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let unet = load_component(
            "UNet",
            &unet_dir,
            "diffusion_pytorch_model",
            options,
            |vs| UNet2DConditionModel::new(vs, &unet_config),
            same_key,
            &mut mappings,
        )?;
        unet.release_mapped_weights();

        let vae_dir = files.part("vae");
        let vae_config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let vae_options = LoadOptions {
            kind: vae_kind(options.kind, second.is_some() || refiner, &vae_config),
            ..options.clone()
        };
        let vae = load_component(
            "VAE",
            &vae_dir,
            "diffusion_pytorch_model",
            &vae_options,
            |vs| build_vae(vs, &vae_config),
            vae_keys,
            &mut mappings,
        )?;
        vae.release_mapped_weights();

        let sched_path = files.part("scheduler").join("scheduler_config.json");
        let scheduler_config = if sched_path.is_file() {
            SchedulerConfig::from_file(&sched_path)?
        } else {
            return Err(Error::bad_model(format!(
                "missing {}",
                sched_path.display()
            )));
        };
        let sdxl = (second.is_some() || refiner).then_some(SdxlFlags {
            refiner,
            force_zeros_for_empty_prompt: files.index_flag("force_zeros_for_empty_prompt", true)?,
            requires_aesthetics_score: files.index_flag("requires_aesthetics_score", refiner)?,
        });
        let mut sd = Self::assemble(
            tokenizer,
            text_encoder,
            second,
            sdxl,
            unet,
            vae,
            scheduler_config,
            options,
        )?;
        sd.mapped_weights = mappings;
        Ok(sd)
    }

    /// Loads a TorchScript export folder (`manifest.json`, `text_encoder.pt`, `unet.pt`,
    /// `vae_encoder.pt`, `vae_decoder.pt`, `tokenizer/`, `scheduler/`). The modules compute in
    /// the exported dtype and convert to and from `options.kind` at their boundaries; they run
    /// only on the device they were traced on.
    fn load_torchscript(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let parts = TorchScriptParts::load(dir, options.device, options.kind)?;
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        if !sched_path.is_file() {
            return Err(Error::bad_model(format!(
                "missing {}",
                sched_path.display()
            )));
        }
        let scheduler_config = SchedulerConfig::from_file(&sched_path)?;
        Ok(Self::from_parts(
            tokenizer,
            Box::new(parts.text_encoder),
            Box::new(parts.unet),
            Box::new(parts.vae),
            scheduler_config,
            options,
        ))
    }

    /// Loads a single-file checkpoint in the original layout: family, prediction type and
    /// configs detected from the file (or configs from `overrides.config_dir`), tensors mapped
    /// from the original keys one at a time. SDXL files give the same parts as an SDXL folder.
    fn load_checkpoint(
        ckpt: Checkpoint,
        options: &LoadOptions,
        overrides: &ModelOverrides,
    ) -> Result<Self> {
        let (device, kind) = (options.device, options.kind);
        let layout = Layout::detect(&ckpt, overrides.use_ema)?;
        let sdxl_family = matches!(layout.family, Family::Sdxl | Family::SdxlRefiner);
        let _pack = pack_weights(options.weight_kernels.packs(sdxl_family));
        let configs = match &overrides.config_dir {
            Some(dir) => configs_from_dir(dir, &layout)?,
            None => SingleFileConfigs::defaults(&ckpt, &layout)?,
        };
        let config_dir = overrides.config_dir.as_deref();
        // The refiner's only tokenizer is an SDXL folder's tokenizer_2/.
        let first = if layout.family == Family::SdxlRefiner {
            "tokenizer_2"
        } else {
            "tokenizer"
        };
        let tokenizer =
            single_file_tokenizer(config_dir, first, || standard_tokenizer(layout.family))?;
        let text_2 = configs.text_2.as_ref().filter(|_| layout.text_2.is_some());

        // Everything the configs describe must fit in the file before anything is built.
        let parameters = [
            count_parameters(|vs| ClipTextTransformer::new(vs, &configs.text))?,
            match text_2 {
                Some(c) => count_parameters(|vs| ClipTextTransformer::new(vs, c))?,
                None => 0,
            },
            count_parameters(|vs| UNet2DConditionModel::new(vs, &configs.unet))?,
            count_parameters(|vs| build_vae(vs, &configs.vae))?,
        ];
        let what = ["text encoder", "second text encoder", "UNet", "VAE"];
        for (what, n) in what.iter().zip(parameters) {
            check_component_size(what, n, ckpt.file_len(), &ckpt.path().display().to_string())?;
        }
        check_component_size(
            "model",
            parameters.iter().fold(0u64, |a, &n| a.saturating_add(n)),
            ckpt.file_len(),
            &ckpt.path().display().to_string(),
        )?;

        let mut vs = var_store(device, kind);
        let text_encoder = ClipTextTransformer::new(vs.root(), &configs.text)?;
        progress::component("text encoder")?;
        load_into_from(
            &ComponentSource::text_encoder(&ckpt, &layout),
            &vs,
            same_key,
        )?;
        vs.freeze();

        let second = match text_2 {
            Some(config) => {
                let mut vs = var_store(device, kind);
                let encoder = ClipTextTransformer::new(vs.root(), config)?;
                progress::component("second text encoder")?;
                load_into_from(
                    &ComponentSource::text_encoder_2(&ckpt, &layout),
                    &vs,
                    same_key,
                )?;
                vs.freeze();
                let tokenizer_2 =
                    single_file_tokenizer(config_dir, "tokenizer_2", ClipTokenizer::standard_sd2)?;
                Some((tokenizer_2, encoder))
            }
            None => None,
        };

        let mut vs = var_store(device, kind);
        let unet = UNet2DConditionModel::new(vs.root(), &configs.unet)?;
        progress::component("UNet")?;
        load_into_from(
            &ComponentSource::unet(&ckpt, &layout, &configs.unet)?,
            &vs,
            same_key,
        )?;
        vs.freeze();

        let mut vs = var_store(device, vae_kind(kind, sdxl_family, &configs.vae));
        let vae = build_vae(vs.root(), &configs.vae)?;
        progress::component("VAE")?;
        load_into_from(
            &ComponentSource::vae(&ckpt, &layout, &configs.vae),
            &vs,
            same_key,
        )?;
        vs.freeze();

        let sdxl = configs.sdxl.map(|f| SdxlFlags {
            refiner: f.refiner,
            force_zeros_for_empty_prompt: f.force_zeros_for_empty_prompt,
            requires_aesthetics_score: f.requires_aesthetics_score,
        });
        Self::assemble(
            tokenizer,
            text_encoder,
            second,
            sdxl,
            unet,
            vae,
            configs.scheduler,
            options,
        )
    }

    /// Checks that the parts fit together.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextTransformer,
        second: Option<(ClipTokenizer, ClipTextTransformer)>,
        sdxl: Option<SdxlFlags>,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: SchedulerConfig,
        options: &LoadOptions,
    ) -> Result<Self> {
        let unet_config = unet.config();
        let text_config = text_encoder.config();
        let vae_config = vae.config();
        let cross = unet_config
            .cross_attention_dim
            .expand(unet_config.block_out_channels.len(), "cross_attention_dim")?;
        // SDXL's UNet attends to both encoders' states side by side.
        let text_width = match &second {
            Some((_, e)) => text_config.hidden_size + e.config().hidden_size,
            None => text_config.hidden_size,
        };
        if cross.iter().any(|&c| c != text_width) {
            return Err(Error::bad_model(format!(
                "UNet cross_attention_dim {cross:?} does not match the text encoders' width {text_width}"
            )));
        }
        // SDXL: the pooled text (the encoder with projection: the second, or the refiner's
        // only one) and the time ids must fill the UNet's add_embedding exactly.
        match (&sdxl, unet.added_input_dims()) {
            (None, None) => {}
            (Some(flags), Some((input_dim, time_dim))) => {
                let pooled_encoder = match &second {
                    Some((_, e)) => e,
                    None => &text_encoder,
                };
                let pooled = TextEncoder::pooled_width(pooled_encoder)
                    .unwrap_or(pooled_encoder.config().hidden_size);
                let (ids, what) = if flags.requires_aesthetics_score {
                    (5, "five time ids (original size, crop, aesthetic score)")
                } else {
                    (6, "six time ids (original size, crop, target size)")
                };
                if pooled + ids * time_dim != input_dim {
                    return Err(Error::bad_model(format!(
                        "the UNet's add_embedding takes {input_dim} values, but the pooled text \
                         ({pooled}) and {what} x {time_dim} make {} \
                         (model_index.json's requires_aesthetics_score: {})",
                        pooled + ids * time_dim,
                        flags.requires_aesthetics_score
                    )));
                }
            }
            (None, Some(_)) => {
                return Err(Error::bad_model(
                    "the UNet takes SDXL's added conditions (addition_embed_type `text_time`) \
                     but the model has no second text encoder (text_encoder_2/)",
                ))
            }
            (Some(_), None) => {
                return Err(Error::bad_model(
                    "the model has SDXL's text encoders but its UNet takes no added \
                     conditions (addition_embed_type)",
                ))
            }
        }
        if sdxl.as_ref().is_some_and(|f| f.refiner) && !text_encoder.config().has_projection() {
            return Err(Error::bad_model(
                "the refiner's text encoder must be a CLIPTextModelWithProjection",
            ));
        }
        if unet_config.out_channels != vae_config.latent_channels {
            return Err(Error::bad_model(format!(
                "UNet out_channels {} differs from the VAE's latent_channels {}",
                unet_config.out_channels, vae_config.latent_channels
            )));
        }
        let vae: Box<dyn Autoencoder> = if vae.kind() == options.kind {
            Box::new(vae)
        } else {
            Box::new(UpcastVae::new(vae, options.kind))
        };
        let mut sd = Self::from_parts(
            tokenizer,
            Box::new(text_encoder),
            Box::new(unet),
            vae,
            scheduler_config,
            options,
        );
        sd.sdxl = sdxl.map(|flags| SdxlText {
            second: second.map(|(t, e)| (t, Box::new(e) as Box<dyn TextEncoder>)),
            force_zeros_for_empty_prompt: flags.force_zeros_for_empty_prompt,
            requires_aesthetics_score: flags.requires_aesthetics_score,
        });
        Ok(sd)
    }
}

/// What `model_index.json` and the folder's layout say about an SDXL model.
struct SdxlFlags {
    /// Only `text_encoder_2/`: the refiner.
    refiner: bool,
    force_zeros_for_empty_prompt: bool,
    requires_aesthetics_score: bool,
}

/// The tokenizer of a single file that comes without one: the standard CLIP vocabulary with
/// the family's pad token (`<|endoftext|>` for CLIP-L, `!` for the OpenCLIP encoders: SDXL's
/// `tokenizer_2/` pads with it too).
fn standard_tokenizer(family: Family) -> Result<ClipTokenizer> {
    match family {
        Family::Sd1 | Family::Sdxl => ClipTokenizer::standard(),
        Family::Sd2 | Family::SdxlRefiner => ClipTokenizer::standard_sd2(),
    }
}

/// A single file's tokenizer: `config_dir`'s `sub/` when it has one, else `standard()`.
fn single_file_tokenizer(
    config_dir: Option<&Path>,
    sub: &str,
    standard: impl FnOnce() -> Result<ClipTokenizer>,
) -> Result<ClipTokenizer> {
    match config_dir.map(|d| d.join(sub)) {
        Some(dir) if dir.is_dir() => ClipTokenizer::from_dir(&dir),
        _ => standard(),
    }
}

/// The configs of a diffusers folder given as `config_dir`, for a single file: `unet/`, `vae/`
/// and `text_encoder/` `config.json` are required (SDXL: `text_encoder_2/` too, the refiner's
/// only one), `scheduler/scheduler_config.json` falls back to the family's default, and
/// `model_index.json`'s SDXL flags to the family's.
fn configs_from_dir(dir: &Path, layout: &Layout) -> Result<SingleFileConfigs> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "config folder {} does not exist",
            dir.display()
        )));
    }
    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    let scheduler = if sched_path.is_file() {
        SchedulerConfig::from_file(&sched_path)?
    } else {
        SingleFileConfigs::default_scheduler(layout)?
    };
    let text_config = |sub: &str| ClipTextConfig::from_file(&dir.join(sub).join("config.json"));
    let (text, text_2) = match layout.family {
        Family::Sd1 | Family::Sd2 => (text_config("text_encoder")?, None),
        Family::Sdxl => (
            text_config("text_encoder")?,
            Some(text_config("text_encoder_2")?),
        ),
        Family::SdxlRefiner => (text_config("text_encoder_2")?, None),
    };
    let sdxl = match SdxlPipelineFlags::defaults(layout.family) {
        Some(d) => {
            let index = ModelFiles {
                root: dir.to_path_buf(),
            };
            Some(SdxlPipelineFlags {
                refiner: d.refiner,
                force_zeros_for_empty_prompt: index.index_flag(
                    "force_zeros_for_empty_prompt",
                    d.force_zeros_for_empty_prompt,
                )?,
                requires_aesthetics_score: index
                    .index_flag("requires_aesthetics_score", d.requires_aesthetics_score)?,
            })
        }
        None => None,
    };
    Ok(SingleFileConfigs {
        unet: UNetConfig::from_file(&dir.join("unet").join("config.json"))?,
        vae: VaeConfig::from_file(&dir.join("vae").join("config.json"))?,
        text,
        text_2,
        scheduler,
        sdxl,
    })
}
