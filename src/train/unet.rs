//! Stage 3: the latent diffusion UNet, trained with the DDPM algorithm (Ho et al. 2020,
//! algorithm 1) in the frozen VAE's latent space, conditioned on the frozen text encoder:
//!
//! - x0 = scaling_factor x z, z sampled from the VAE encoder's posterior of a data image;
//! - t uniform over the training timesteps, ε ~ N(0, I);
//! - x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, with ᾱ from the scheduler's [`TrainSchedule`];
//! - loss = mean over elements of (ε - ε_θ(x_t, t, c))², c the text encoder's hidden states
//!   of the caption, replaced by those of the empty prompt with probability `cfg_dropout` so
//!   that the same network also learns the unconditional ε_θ(x_t, t, ∅) of classifier-free
//!   guidance;
//! - optionally each sample's loss weighted by min(SNR_t, γ) / SNR_t (min-SNR-γ, Hang et al.
//!   2023): the nearly noise-free timesteps, which only polish pixels, stop dominating the
//!   gradient, and the noisy ones, where colour and shape are decided, get the capacity.
//!
//! Latents and text embeddings are computed once (both encoders are frozen), which leaves
//! the UNet's forward and backward as the whole cost of a step.
use super::clip::ClipOutput;
use super::dataset::{self, CaptionParts, Rng, Spec, Split};
use super::vae::VaeOutput;
use super::{run_stage, seeded_store, streams, Recipe, StageOutcome, StageRun};
use crate::models::{UNet2DConditionModel, UNetConfig};
use crate::schedulers::{BetaSchedule, SchedulerConfig, TrainSchedule};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The scheduler config the model ships with: Stable Diffusion 1.x's DDIM settings.
pub fn scheduler_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// The training noise schedule of [`scheduler_json`], through the schedulers' own maths.
pub fn train_schedule() -> Result<TrainSchedule> {
    let cfg = SchedulerConfig::from_json_str(&scheduler_json().to_string())?;
    TrainSchedule::from_config(
        &cfg,
        (1000, 0.0001, 0.02, BetaSchedule::Linear),
        &[BetaSchedule::Linear, BetaSchedule::ScaledLinear],
        "DDIMScheduler",
    )
}

/// The forward process q(x_t | x0) with one timestep per sample: `t` holds training-timestep
/// indices `[b]`.
pub fn add_noise(
    schedule: &TrainSchedule,
    x0: &Tensor,
    noise: &Tensor,
    t: &Tensor,
) -> Result<Tensor> {
    let a = schedule
        .alphas_cumprod
        .f_index_select(0, t)?
        .f_view([-1, 1, 1, 1])?
        .f_to_kind(x0.kind())?;
    let sqrt_a = a.f_sqrt()?;
    let sqrt_1ma = a.f_rsub_scalar(1.0)?.f_sqrt()?;
    Ok(x0.f_mul(&sqrt_a)?.f_add(&noise.f_mul(&sqrt_1ma)?)?)
}

pub fn config(recipe: &Recipe) -> Result<UNetConfig> {
    let cfg: UNetConfig = serde_json::from_value(recipe.unet.clone())
        .map_err(|e| Error::bad_model(format!("UNet recipe: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

pub struct UNetOutput {
    pub vs: VarStore,
    pub unet: UNet2DConditionModel,
    pub config: UNetConfig,
    pub outcome: StageOutcome,
    /// Seconds spent encoding the latent pool and the captions.
    pub prepare_seconds: f64,
}

/// The frozen encoders' outputs the UNet trains on.
pub struct Prepared {
    /// Posterior means and standard deviations of the pool's images, `[n, 4, h, w]`.
    pub mean: Tensor,
    pub std: Tensor,
    pub specs: Vec<Spec>,
    /// Text encoder hidden states `[k, 77, d]` of every training caption, the empty prompt
    /// last; `index` maps a caption to its row.
    pub embeddings: Tensor,
    pub index: HashMap<String, i64>,
}

/// Encodes the latent pool and every training caption.
pub fn prepare(recipe: &Recipe, seed: u64, vae: &VaeOutput, clip: &ClipOutput) -> Result<Prepared> {
    let _g = tch::no_grad_guard();
    let size = recipe.image_size;
    let mut rng = Rng::derive(seed, streams::LATENTS, 0);
    let specs: Vec<Spec> = (0..recipe.latent_pool)
        .map(|_| Spec::sample(&mut rng, Split::Train, size))
        .collect();
    let mut means = Vec::new();
    let mut stds = Vec::new();
    for chunk in specs.chunks(128) {
        let images: Vec<Vec<u8>> = chunk.iter().map(dataset::render).collect();
        let post = vae.vae.encode(&dataset::to_tensor(&images, size)?)?;
        means.push(post.mean.shallow_clone());
        stds.push(post.std()?);
    }
    let mut captions = dataset::all_captions(false);
    captions.push(String::new());
    let mut rows = Vec::new();
    for chunk in captions.chunks(256) {
        let ids: Vec<i64> = chunk
            .iter()
            .flat_map(|c| clip.tokenizer.encode_padded(c))
            .collect();
        let ids = Tensor::f_from_slice(&ids)?.f_view([chunk.len() as i64, -1])?;
        rows.push(clip.text.forward(&ids, 0)?);
    }
    let index = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i as i64))
        .collect();
    Ok(Prepared {
        mean: Tensor::f_cat(&means, 0)?,
        std: Tensor::f_cat(&stds, 0)?,
        specs,
        embeddings: Tensor::f_cat(&rows, 0)?,
        index,
    })
}

/// The loss of one step: a batch of pool latents, their (part-dropped or empty) captions,
/// timesteps and noise, all drawn from `rng`.
pub fn loss(
    unet: &UNet2DConditionModel,
    data: &Prepared,
    schedule: &TrainSchedule,
    scaling_factor: f64,
    batch: usize,
    cfg_dropout: f64,
    min_snr_gamma: f64,
    rng: &mut Rng,
) -> Result<Tensor> {
    let n = data.specs.len();
    let picks: Vec<i64> = (0..batch).map(|_| rng.below(n) as i64).collect();
    let rows: Vec<i64> = picks
        .iter()
        .map(|&i| {
            let caption = if (rng.uniform() as f64) < cfg_dropout {
                String::new()
            } else {
                data.specs[i as usize].caption_with(CaptionParts::sample(rng))
            };
            data.index.get(&caption).copied().ok_or_else(|| {
                Error::Internal(format!("caption {caption:?} missing from the table"))
            })
        })
        .collect::<Result<_>>()?;
    let picks = Tensor::f_from_slice(&picks)?;
    let mean = data.mean.f_index_select(0, &picks)?;
    let std = data.std.f_index_select(0, &picks)?;
    let shape = mean.size();
    let z = mean.f_add(&std.f_mul(&super::gaussian(rng, &shape)?)?)?;
    let x0 = z.f_mul_scalar(scaling_factor)?;
    let context = data
        .embeddings
        .f_index_select(0, &Tensor::f_from_slice(&rows)?)?;
    let t: Vec<i64> = (0..batch)
        .map(|_| rng.below(schedule.num_train_timesteps) as i64)
        .collect();
    let t = Tensor::f_from_slice(&t)?;
    let noise = super::gaussian(rng, &shape)?;
    let xt = add_noise(schedule, &x0, &noise, &t)?;
    let pred = unet.forward_timesteps(&xt, &t.f_to_kind(Kind::Float)?, &context)?;
    let per_sample =
        pred.f_sub(&noise)?
            .f_square()?
            .f_mean_dim(&[1i64, 2, 3][..], false, Kind::Float)?;
    if min_snr_gamma <= 0.0 {
        return Ok(per_sample.f_mean(Kind::Float)?);
    }
    let weight = min_snr_weight(schedule, &t, min_snr_gamma)?;
    Ok(per_sample.f_mul(&weight)?.f_mean(Kind::Float)?)
}

/// min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 - ᾱ_t), per training-timestep index in `t`.
pub fn min_snr_weight(schedule: &TrainSchedule, t: &Tensor, gamma: f64) -> Result<Tensor> {
    let a = schedule
        .alphas_cumprod
        .f_index_select(0, t)?
        .f_to_kind(Kind::Float)?;
    let snr = a.f_div(&a.f_rsub_scalar(1.0)?)?;
    Ok(snr.f_clamp_max(gamma)?.f_div(&snr)?)
}

/// Trains (or resumes, or loads) the UNet.
pub fn train(
    recipe: &Recipe,
    run: &StageRun,
    vae: &VaeOutput,
    clip: &ClipOutput,
    _tokenizer_dir: &Path,
) -> Result<UNetOutput> {
    let cfg = config(recipe)?;
    if cfg.cross_attention_dim != crate::models::config::PerBlock::One(clip.config.hidden_size) {
        return Err(Error::bad_model(format!(
            "UNet cross_attention_dim {:?} differs from the text encoder's width {}",
            cfg.cross_attention_dim, clip.config.hidden_size
        )));
    }
    let (vs, unet) = seeded_store(run.seed ^ streams::UNET, |vs| {
        UNet2DConditionModel::new(vs.root(), &cfg)
    })?;
    let t = Instant::now();
    // A finished stage only reloads its weights: no need to encode anything.
    let data = if run.load_only || super::is_finished(run)? {
        None
    } else {
        Some(prepare(recipe, run.seed, vae, clip)?)
    };
    let prepare_seconds = t.elapsed().as_secs_f64();
    let schedule = train_schedule()?;
    let seed = run.seed;
    let outcome = run_stage(run, &vs, |step| {
        let mut rng = Rng::derive(seed, streams::UNET, step as u64);
        let data = data
            .as_ref()
            .ok_or_else(|| Error::Internal("UNet data not prepared".into()))?;
        loss(
            &unet,
            data,
            &schedule,
            vae.scaling_factor,
            recipe.unet_batch,
            recipe.cfg_dropout,
            recipe.min_snr_gamma,
            &mut rng,
        )
    })?;
    Ok(UNetOutput {
        vs,
        unet,
        config: cfg,
        outcome,
        prepare_seconds,
    })
}
