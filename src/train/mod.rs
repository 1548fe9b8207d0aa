//! Training our own tiny Stable Diffusion from scratch on a procedural shapes data set, with
//! tch autograd and the very model types the inference pipeline loads.
//!
//! `sd train` (or `make train-tiny`) runs, with a fixed seed and resumable checkpoints under
//! `out/train/`:
//! 1. [`vocab`]: the real CLIP BPE vocabulary pruned to the data set's words;
//! 2. [`vae`]: an [`AutoencoderKL`](crate::models::AutoencoderKL) (reconstruction + KL);
//! 3. [`clip`]: the CLIP text transformer with a small image encoder, contrastive loss;
//! 4. [`unet`]: the latent diffusion [`UNet2DConditionModel`](crate::models::UNet2DConditionModel)
//!    on the frozen VAE's latents and the frozen text encoder's embeddings (ε-prediction);
//! 5. [`export`]: the diffusers folder (`models/tiny`), loaded back by the normal loader.
//!
//! [`eval`] measures prompt adherence of any model folder with the analytic [`checker`].
pub mod checker;
pub mod clip;
pub mod dataset;
pub mod eval;
pub mod export;
pub mod optim;
pub mod unet;
pub mod vae;
pub mod vocab;

use crate::models::clip_vision::ClipVisionConfig;
use crate::{Error, Result};
use dataset::Rng;
use optim::{AdamW, Checkpoint, CheckpointMeta, Ema};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Random streams of a run, one per use, so that each is independent of the others.
pub mod streams {
    pub const VAE: u64 = 1;
    pub const CLIP: u64 = 2;
    pub const LATENTS: u64 = 3;
    pub const UNET: u64 = 4;
    pub const EVAL: u64 = 5;
    pub const INIT: u64 = 6;
}

/// Sizes, step counts and learning rates of a training run.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub image_size: usize,
    /// diffusers `AutoencoderKL` config (the `scaling_factor` is measured after training).
    pub vae: serde_json::Value,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    pub vae_kl_weight: f64,
    /// Reconstruction loss: mean absolute (`true`) or squared error.
    pub vae_l1: bool,
    /// transformers `CLIPTextModel` config (`vocab_size` is the pruned vocabulary's).
    pub text: serde_json::Value,
    pub vision: ClipVisionConfig,
    pub clip_steps: usize,
    pub clip_batch: usize,
    pub clip_lr: f64,
    /// diffusers `UNet2DConditionModel` config.
    pub unet: serde_json::Value,
    pub unet_steps: usize,
    pub unet_batch: usize,
    pub unet_lr: f64,
    /// How many images are encoded once to latents for the UNet stage.
    pub latent_pool: usize,
    /// Probability that a caption is replaced by the empty prompt (classifier-free guidance).
    pub cfg_dropout: f64,
    /// γ of the min-SNR loss weighting of the UNet stage; 0 weights every timestep alike.
    pub min_snr_gamma: f64,
    pub ema_decay: f64,
    /// Images used for the stage figures (PSNR, retrieval accuracy).
    pub figure_images: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
}

impl Recipe {
    /// The recipe of the shipped model (`models/tiny`).
    pub fn full() -> Self {
        Self {
            image_size: 32,
            // Two levels: 32x32x3 images <-> 16x16x4 latents. No mid-block attention: a purely
            // convolutional (local) autoencoder generalises to the held-out colour x shape
            // combinations, which it never sees.
            vae: serde_json::json!({
                "_class_name": "AutoencoderKL",
                "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [32, 64],
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
                "layers_per_block": 1, "norm_num_groups": 16, "act_fn": "silu",
                "sample_size": 32, "scaling_factor": 1.0,
                "mid_block_add_attention": false, "force_upcast": false
            }),
            vae_steps: 1200,
            vae_batch: 32,
            vae_lr: 2e-3,
            vae_kl_weight: 1e-4,
            vae_l1: true,
            text: serde_json::json!({
                "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                "num_attention_heads": 4, "max_position_embeddings": 77,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64
            }),
            vision: ClipVisionConfig {
                channels: vec![32, 64, 128],
                norm_num_groups: 16,
                projection_dim: 64,
            },
            clip_steps: 400,
            clip_batch: 128,
            clip_lr: 1e-3,
            // Three levels on 16x16 latents (16 -> 8 -> 4), cross-attention at 8x8 and 4x4.
            unet: serde_json::json!({
                "_class_name": "UNet2DConditionModel",
                "sample_size": 16, "in_channels": 4, "out_channels": 4,
                "block_out_channels": [32, 64, 128],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 64,
                "norm_num_groups": 16, "norm_eps": 1e-5, "act_fn": "silu",
                "flip_sin_to_cos": true, "freq_shift": 0, "downsample_padding": 1,
                "use_linear_projection": false
            }),
            unet_steps: 3800,
            unet_batch: 64,
            unet_lr: 2e-3,
            latent_pool: 12000,
            cfg_dropout: 0.1,
            min_snr_gamma: 5.0,
            ema_decay: 0.999,
            figure_images: 256,
            checkpoint_every: 200,
        }
    }

    /// A miniature of the full recipe for tests: same code paths, seconds to run.
    pub fn tiny() -> Self {
        let mut r = Self::full();
        r.vae["block_out_channels"] = serde_json::json!([16, 16]);
        r.vae["norm_num_groups"] = serde_json::json!(8);
        r.vae_steps = 40;
        r.vae_batch = 8;
        r.text["hidden_size"] = serde_json::json!(32);
        r.text["intermediate_size"] = serde_json::json!(64);
        r.text["num_hidden_layers"] = serde_json::json!(2);
        r.vision = ClipVisionConfig {
            channels: vec![16, 16, 16],
            norm_num_groups: 8,
            projection_dim: 32,
        };
        r.clip_steps = 40;
        r.clip_batch = 32;
        r.unet["block_out_channels"] = serde_json::json!([32, 32, 32]);
        r.unet["cross_attention_dim"] = serde_json::json!(32);
        r.unet_steps = 40;
        r.unet_batch = 16;
        r.latent_pool = 256;
        r.ema_decay = 0.9;
        r.figure_images = 32;
        r.checkpoint_every = 20;
        r
    }
}

impl Recipe {
    /// Applies `key=value`: a numeric field (`unet_steps=500`) or a field of one of the
    /// model configs, its value JSON (`vae.block_out_channels=[16,32,64]`).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("`{assignment}` is not key=value")))?;
        let bad = |what: &str| Error::invalid(format!("recipe `{assignment}`: {what}"));
        if let Some((model, field)) = key.split_once('.') {
            let v: serde_json::Value =
                serde_json::from_str(value).map_err(|e| bad(&e.to_string()))?;
            let target = match model {
                "vae" => &mut self.vae,
                "text" => &mut self.text,
                "unet" => &mut self.unet,
                "vision" => {
                    let mut json =
                        serde_json::to_value(&self.vision).map_err(|e| bad(&e.to_string()))?;
                    json[field] = v;
                    self.vision = serde_json::from_value(json).map_err(|e| bad(&e.to_string()))?;
                    return Ok(());
                }
                _ => return Err(bad("unknown model (vae, text, vision, unet)")),
            };
            target[field] = v;
            return Ok(());
        }
        let int = || value.parse::<usize>().map_err(|e| bad(&e.to_string()));
        let float = || value.parse::<f64>().map_err(|e| bad(&e.to_string()));
        match key {
            "image_size" => self.image_size = int()?,
            "vae_steps" => self.vae_steps = int()?,
            "vae_batch" => self.vae_batch = int()?,
            "vae_lr" => self.vae_lr = float()?,
            "vae_kl_weight" => self.vae_kl_weight = float()?,
            "vae_l1" => self.vae_l1 = value == "true",
            "clip_steps" => self.clip_steps = int()?,
            "clip_batch" => self.clip_batch = int()?,
            "clip_lr" => self.clip_lr = float()?,
            "unet_steps" => self.unet_steps = int()?,
            "unet_batch" => self.unet_batch = int()?,
            "unet_lr" => self.unet_lr = float()?,
            "latent_pool" => self.latent_pool = int()?,
            "cfg_dropout" => self.cfg_dropout = float()?,
            "min_snr_gamma" => self.min_snr_gamma = float()?,
            "ema_decay" => self.ema_decay = float()?,
            "figure_images" => self.figure_images = int()?,
            "checkpoint_every" => self.checkpoint_every = int()?,
            _ => return Err(bad("unknown field")),
        }
        Ok(())
    }
}

/// How a stage runs: steps, schedule and where it checkpoints.
#[derive(Debug, Clone)]
pub struct StageRun {
    pub name: String,
    pub steps: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Final learning rate as a fraction of `lr` (cosine decay).
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: Option<f64>,
    pub seed: u64,
    /// Checkpoint folder; `None` trains without checkpoints (tests).
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_every: usize,
    /// Steps per logged loss window.
    pub log_every: usize,
    pub progress: bool,
    /// Load the checkpoint as it is (EMA weights if any) and train nothing.
    pub load_only: bool,
}

impl StageRun {
    pub fn new(name: &str, steps: usize, lr: f64, seed: u64) -> Self {
        Self {
            name: name.into(),
            steps,
            lr,
            warmup: (steps / 20).clamp(1, 100),
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: None,
            seed,
            checkpoint_dir: None,
            checkpoint_every: 200,
            log_every: 10,
            progress: false,
            load_only: false,
        }
    }
}

/// What a stage produced besides its weights.
#[derive(Debug, Clone, Default)]
pub struct StageOutcome {
    /// Mean loss of each window of `log_every` steps.
    pub losses: Vec<f64>,
    pub seconds: f64,
    /// The step training (re)started from; equal to `steps` when a finished checkpoint was
    /// loaded.
    pub started_at: usize,
    pub figures: serde_json::Map<String, serde_json::Value>,
}

impl StageOutcome {
    /// The mean of the first and of the last `k` logged windows.
    pub fn first_last(&self, k: usize) -> (f64, f64) {
        let k = k.max(1).min(self.losses.len().max(1));
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        (
            mean(&self.losses[..k.min(self.losses.len())]),
            mean(&self.losses[self.losses.len().saturating_sub(k)..]),
        )
    }
}

/// Runs (or resumes, or skips when finished) one training stage. `loss_at(step)` computes the
/// scalar loss of one step; it must draw its randomness from the step number (e.g.
/// [`Rng::derive`]) so that a resumed run repeats what an uninterrupted one would do. With
/// an EMA, the averaged weights are copied into the model at the end.
pub fn run_stage(
    run: &StageRun,
    vs: &VarStore,
    mut loss_at: impl FnMut(usize) -> Result<Tensor>,
) -> Result<StageOutcome> {
    let vars = optim::named_trainables(vs);
    let shallow = |v: &[(String, Tensor)]| {
        v.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect::<Vec<_>>()
    };
    let mut adam = AdamW::new(shallow(&vars), run.weight_decay);
    let mut ema = run.ema_decay.map(|d| Ema::new(&vars, d));
    let ckpt = run
        .checkpoint_dir
        .as_deref()
        .map(|d| Checkpoint::new(d, &run.name));
    let mut meta = CheckpointMeta {
        stage: run.name.clone(),
        seed: run.seed,
        total_steps: run.steps,
        ..Default::default()
    };
    if let Some(ck) = &ckpt {
        if let Some(old) = ck.read_meta()? {
            if old.seed != run.seed || old.total_steps != run.steps {
                return Err(Error::invalid(format!(
                    "{} was written for seed {} / {} steps, this run has seed {} / {} steps; \
                     use a fresh output folder (or --fresh)",
                    ck.meta.display(),
                    old.seed,
                    old.total_steps,
                    run.seed,
                    run.steps
                )));
            }
            let tensors = ck.read_tensors()?;
            optim::load_model_state(vs, &tensors)?;
            adam.load_state(&tensors)?;
            adam.steps = old.step as i64;
            if let Some(e) = ema.as_mut() {
                e.load_state(&tensors)?;
            }
            meta = old;
        }
    }
    let started_at = meta.step;
    if meta.finished || run.load_only {
        if let Some(e) = &ema {
            e.copy_to(vs)?;
        }
        return Ok(StageOutcome {
            losses: meta.losses.clone(),
            seconds: meta.seconds,
            started_at,
            figures: meta.figures.clone(),
        });
    }

    let save = |meta: &CheckpointMeta, adam: &AdamW, ema: &Option<Ema>| -> Result<()> {
        if let Some(ck) = &ckpt {
            let mut tensors = optim::model_state(vs);
            tensors.extend(adam.state());
            if let Some(e) = ema {
                tensors.extend(e.state());
            }
            ck.write(&tensors, meta)?;
        }
        Ok(())
    };

    let bar = optim::progress(&run.name, run.steps, meta.step, run.progress);
    let t0 = Instant::now();
    let seconds_before = meta.seconds;
    let mut window = (0.0f64, 0usize);
    for step in meta.step..run.steps {
        adam.zero_grad();
        let loss = loss_at(step)?;
        let value = loss.f_double_value(&[])?;
        if !value.is_finite() {
            return Err(Error::Internal(format!(
                "{}: loss is {value} at step {step}",
                run.name
            )));
        }
        loss.f_backward()?;
        adam.clip_grad_norm(run.grad_clip)?;
        let lr = optim::lr_at(step, run.steps, run.warmup, run.lr, run.min_lr_ratio);
        adam.step(lr)?;
        if let Some(e) = ema.as_mut() {
            e.update(&vars, step as i64)?;
        }
        window.0 += value;
        window.1 += 1;
        if window.1 == run.log_every || step + 1 == run.steps {
            meta.losses.push(window.0 / window.1 as f64);
            bar.set_message(format!("loss {:.4}", window.0 / window.1 as f64));
            window = (0.0, 0);
        }
        bar.inc(1);
        meta.step = step + 1;
        if meta.step % run.checkpoint_every == 0 && meta.step < run.steps {
            meta.seconds = seconds_before + t0.elapsed().as_secs_f64();
            save(&meta, &adam, &ema)?;
        }
    }
    bar.finish();
    meta.seconds = seconds_before + t0.elapsed().as_secs_f64();
    meta.finished = true;
    save(&meta, &adam, &ema)?;
    if let Some(e) = &ema {
        e.copy_to(vs)?;
    }
    Ok(StageOutcome {
        losses: meta.losses.clone(),
        seconds: meta.seconds,
        started_at,
        figures: meta.figures.clone(),
    })
}

/// Whether the stage's checkpoint says it is finished.
pub fn is_finished(run: &StageRun) -> Result<bool> {
    match &run.checkpoint_dir {
        Some(dir) => Ok(Checkpoint::new(dir, &run.name)
            .read_meta()?
            .is_some_and(|m| m.finished && m.seed == run.seed && m.total_steps == run.steps)),
        None => Ok(false),
    }
}

/// Stores the stage's figures in its (finished) checkpoint's metadata.
pub fn record_figures(
    run: &StageRun,
    figures: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    if let Some(dir) = &run.checkpoint_dir {
        let ck = Checkpoint::new(dir, &run.name);
        if let Some(mut meta) = ck.read_meta()? {
            meta.figures = figures.clone();
            let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Json {
                path: ck.meta.clone(),
                source: e,
            })?;
            std::fs::write(&ck.meta, text).map_err(|e| Error::io(&ck.meta, e))?;
        }
    }
    Ok(())
}

/// Standard normal noise of `shape` from our own generator (Box-Muller), so that training
/// never depends on libtorch's global generator.
pub fn gaussian(rng: &mut Rng, shape: &[i64]) -> Result<Tensor> {
    let n: i64 = shape.iter().product();
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as i64) < n {
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos()) as f32);
        v.push((r * th.sin()) as f32);
    }
    v.truncate(n as usize);
    Ok(Tensor::f_from_slice(&v)?.f_view(shape)?)
}

/// A new variable store whose initial values come from `seed` (libtorch's generator is
/// seeded under the library's global lock while the model is built).
pub fn seeded_store<T>(
    seed: u64,
    build: impl FnOnce(&VarStore) -> Result<T>,
) -> Result<(VarStore, T)> {
    let _guard = crate::rng::GLOBAL_RNG.lock();
    tch::manual_seed(Rng::derive(seed, streams::INIT, 0).next_u64() as i64 & i64::MAX);
    let vs = VarStore::new(Device::Cpu);
    let model = build(&vs)?;
    Ok((vs, model))
}

/// Options of [`train_all`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Checkpoints and intermediate files (`out/train`).
    pub work_dir: PathBuf,
    /// Where the finished model is written (`models/tiny`).
    pub model_dir: PathBuf,
    pub seed: u64,
    pub recipe: Recipe,
    /// Start over instead of resuming.
    pub fresh: bool,
    pub progress: bool,
    /// Stop after this stage (`tokenizer`, `vae`, `clip`); for experiments.
    pub stop_after: Option<String>,
    /// Export the UNet checkpoint as it is, without training; for experiments.
    pub export_only: bool,
}

/// Everything [`train_all`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub seconds: serde_json::Map<String, serde_json::Value>,
    pub figures: serde_json::Map<String, serde_json::Value>,
    pub model_bytes: u64,
}

impl TrainSummary {
    /// The figures of a run stopped after a stage (`stop_after`): nothing exported.
    fn stopped_early(
        seconds: serde_json::Map<String, serde_json::Value>,
        figures: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        Self {
            seconds,
            figures,
            model_bytes: 0,
        }
    }
}

/// Runs every stage (resuming from checkpoints) and exports the model.
pub fn train_all(opts: &TrainOptions) -> Result<TrainSummary> {
    let t0 = Instant::now();
    if opts.fresh && opts.work_dir.is_dir() {
        for entry in std::fs::read_dir(&opts.work_dir).map_err(|e| Error::io(&opts.work_dir, e))? {
            let path = entry.map_err(|e| Error::io(&opts.work_dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".safetensors") || name.ends_with(".json") {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    std::fs::create_dir_all(&opts.work_dir).map_err(|e| Error::io(&opts.work_dir, e))?;
    let say = |s: String| {
        if opts.progress {
            eprintln!("{s}");
        }
    };
    let mut seconds = serde_json::Map::new();
    let mut figures = serde_json::Map::new();

    // 1. Tokenizer.
    let t = Instant::now();
    let tok_dir = opts.work_dir.join("tokenizer");
    let pruned = export::write_tokenizer(&tok_dir)?;
    say(format!(
        "tokenizer: {} tokens ({} merges) in {}, identical to the full vocabulary on {} captions and words",
        pruned.0, pruned.1, tok_dir.display(), pruned.2
    ));
    seconds.insert("tokenizer".into(), t.elapsed().as_secs_f64().into());

    if opts.stop_after.as_deref() == Some("tokenizer") {
        return Ok(TrainSummary::stopped_early(seconds, figures));
    }
    // 2. VAE.
    let r = &opts.recipe;
    let mut run = StageRun::new("vae", r.vae_steps, r.vae_lr, opts.seed);
    run.checkpoint_dir = Some(opts.work_dir.clone());
    run.checkpoint_every = r.checkpoint_every;
    run.progress = opts.progress;
    let vae_out = vae::train(r, &run)?;
    say(format!(
        "vae: PSNR {:.2} dB on held-out combinations, {:.2} dB on training ones; scaling_factor {:.4} ({:.0} s)",
        vae_out.psnr_held_out, vae_out.psnr_train, vae_out.scaling_factor, vae_out.outcome.seconds
    ));
    seconds.insert("vae".into(), vae_out.outcome.seconds.into());
    figures.insert("vae_psnr_held_out_db".into(), vae_out.psnr_held_out.into());
    figures.insert("vae_psnr_train_db".into(), vae_out.psnr_train.into());
    figures.insert("vae_scaling_factor".into(), vae_out.scaling_factor.into());

    if opts.stop_after.as_deref() == Some("vae") {
        return Ok(TrainSummary::stopped_early(seconds, figures));
    }
    // 3. CLIP.
    let mut run = StageRun::new("clip", r.clip_steps, r.clip_lr, opts.seed);
    run.checkpoint_dir = Some(opts.work_dir.clone());
    run.checkpoint_every = r.checkpoint_every;
    run.progress = opts.progress;
    run.weight_decay = 0.1;
    let clip_out = clip::train(r, &run, &tok_dir)?;
    say(format!(
        "clip: image-to-text top-1 retrieval {:.1} % on held-out pairs ({:.1} % on unseen pairs of training combinations) ({:.0} s)",
        100.0 * clip_out.retrieval_held_out,
        100.0 * clip_out.retrieval_train,
        clip_out.outcome.seconds
    ));
    seconds.insert("clip".into(), clip_out.outcome.seconds.into());
    figures.insert(
        "clip_retrieval_held_out".into(),
        clip_out.retrieval_held_out.into(),
    );
    figures.insert(
        "clip_retrieval_train".into(),
        clip_out.retrieval_train.into(),
    );
    figures.insert("clip_candidates".into(), clip_out.candidates.into());

    if opts.stop_after.as_deref() == Some("clip") {
        return Ok(TrainSummary::stopped_early(seconds, figures));
    }
    // 4. UNet.
    let mut run = StageRun::new("unet", r.unet_steps, r.unet_lr, opts.seed);
    run.checkpoint_dir = Some(opts.work_dir.clone());
    run.checkpoint_every = r.checkpoint_every;
    run.progress = opts.progress;
    run.ema_decay = Some(r.ema_decay);
    run.load_only = opts.export_only;
    let unet_out = unet::train(r, &run, &vae_out, &clip_out, &tok_dir)?;
    say(format!(
        "unet: loss {:.4} -> {:.4} ({:.0} s)",
        unet_out.outcome.first_last(5).0,
        unet_out.outcome.first_last(5).1,
        unet_out.outcome.seconds
    ));
    seconds.insert("unet_prepare".into(), unet_out.prepare_seconds.into());
    seconds.insert("unet".into(), unet_out.outcome.seconds.into());

    // 5. Export.
    let t = Instant::now();
    let bytes = export::write_model(&opts.model_dir, r, &tok_dir, &vae_out, &clip_out, &unet_out)?;
    say(format!(
        "model: {} ({:.1} MB), loads with the pipeline's loader",
        opts.model_dir.display(),
        bytes as f64 / 1e6
    ));
    seconds.insert("export".into(), t.elapsed().as_secs_f64().into());
    seconds.insert("this_run_total".into(), t0.elapsed().as_secs_f64().into());
    let summary = TrainSummary {
        seconds,
        figures,
        model_bytes: bytes,
    };
    let path = opts.work_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Json {
        path: path.clone(),
        source: e,
    })?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(summary)
}

/// PSNR in dB of images in [-1, 1] against references in [-1, 1], on the [0, 1] scale.
pub fn psnr(images: &Tensor, refs: &Tensor) -> Result<f64> {
    let a = images
        .f_clamp(-1.0, 1.0)?
        .f_add_scalar(1.0)?
        .f_div_scalar(2.0)?;
    let b = refs.f_add_scalar(1.0)?.f_div_scalar(2.0)?;
    let mse = a
        .f_sub(&b)?
        .f_square()?
        .f_mean(Kind::Float)?
        .f_double_value(&[])?;
    Ok(10.0 * (1.0 / mse.max(1e-12)).log10())
}

/// The default work folder and model folder, relative to the repository root.
pub fn default_paths() -> (PathBuf, PathBuf) {
    (PathBuf::from("out/train"), PathBuf::from("models/tiny"))
}

/// A path's total size in bytes (files under it, recursively).
pub fn dir_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum())
        .unwrap_or(0)
}
