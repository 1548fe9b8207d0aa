//! Stage 1: the VAE. An [`AutoencoderKL`] learns to reconstruct the data set's images through
//! its 4-channel latent: loss = mean absolute (or squared) error of the reconstruction (from a latent
//! sampled with the reparameterisation trick) + `kl_weight` x the mean KL divergence of the
//! encoder's diagonal Gaussian from N(0, I).
use super::dataset::{self, Rng, Split};
use super::{
    psnr, record_figures, run_stage, seeded_store, streams, Recipe, StageOutcome, StageRun,
};
use crate::models::{AutoencoderKL, VaeConfig};
use crate::{Error, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

pub struct VaeOutput {
    pub vs: VarStore,
    pub vae: AutoencoderKL,
    pub config: VaeConfig,
    pub outcome: StageOutcome,
    /// PSNR (dB) of posterior-mean reconstructions of held-out and training combinations.
    pub psnr_held_out: f64,
    pub psnr_train: f64,
    /// 1 / std of the latents, so that the UNet sees unit-variance latents.
    pub scaling_factor: f64,
}

pub fn config(recipe: &Recipe) -> Result<VaeConfig> {
    let cfg: VaeConfig = serde_json::from_value(recipe.vae.clone())
        .map_err(|e| Error::bad_model(format!("VAE recipe: {e}")))?;
    cfg.validate()?;
    Ok(cfg)
}

/// KL(N(mean, exp(logvar)) || N(0, I)), averaged over elements.
pub fn kl(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    Ok(mean
        .f_square()?
        .f_add(&logvar.f_exp()?)?
        .f_sub_scalar(1.0)?
        .f_sub(logvar)?
        .f_mean(Kind::Float)?
        .f_mul_scalar(0.5)?)
}

/// The loss of one batch of images in [-1, 1].
pub fn loss(
    vae: &AutoencoderKL,
    images: &Tensor,
    rng: &mut Rng,
    kl_weight: f64,
    l1: bool,
) -> Result<Tensor> {
    let post = vae.encode(images)?;
    let eps = super::gaussian(rng, &post.mean.size())?;
    let z = post.mean.f_add(&post.std()?.f_mul(&eps)?)?;
    let recon = vae.decode(&z)?;
    let diff = recon.f_sub(images)?;
    let rec = if l1 { diff.f_abs()? } else { diff.f_square()? }.f_mean(Kind::Float)?;
    Ok(rec.f_add(&kl(&post.mean, &post.logvar)?.f_mul_scalar(kl_weight)?)?)
}

/// Trains (or resumes, or loads) the VAE and measures it.
pub fn train(recipe: &Recipe, run: &StageRun) -> Result<VaeOutput> {
    let cfg = config(recipe)?;
    let (vs, vae) = seeded_store(run.seed ^ streams::VAE, |vs| {
        AutoencoderKL::new(vs.root(), &cfg)
    })?;
    let size = recipe.image_size;
    let batch = recipe.vae_batch;
    let kl_weight = recipe.vae_kl_weight;
    let l1 = recipe.vae_l1;
    let seed = run.seed;
    let mut outcome = run_stage(run, &vs, |step| {
        let mut rng = Rng::derive(seed, streams::VAE, step as u64);
        let (_, images) = dataset::batch(&mut rng, Split::Train, batch, size)?;
        loss(&vae, &images, &mut rng, kl_weight, l1)
    })?;
    let (psnr_held_out, psnr_train, scaling_factor) = measure(&vae, recipe, seed)?;
    let (small, large) = checker_on_reconstructions(&vae, recipe, seed)?;
    outcome
        .figures
        .insert("checker_on_recon_small".into(), small.into());
    outcome
        .figures
        .insert("checker_on_recon_large".into(), large.into());
    outcome
        .figures
        .insert("psnr_held_out_db".into(), psnr_held_out.into());
    outcome
        .figures
        .insert("psnr_train_db".into(), psnr_train.into());
    outcome
        .figures
        .insert("scaling_factor".into(), scaling_factor.into());
    record_figures(run, &outcome.figures)?;
    Ok(VaeOutput {
        vs,
        vae,
        config: cfg,
        outcome,
        psnr_held_out,
        psnr_train,
        scaling_factor,
    })
}

/// PSNR on fresh images of the held-out and of the training combinations, and the latent
/// scaling factor (1 / std of sampled latents of training images).
pub fn measure(vae: &AutoencoderKL, recipe: &Recipe, seed: u64) -> Result<(f64, f64, f64)> {
    let _g = tch::no_grad_guard();
    let n = recipe.figure_images;
    let size = recipe.image_size;
    let mut rng = Rng::derive(seed, streams::EVAL, 1);
    let mut result = Vec::new();
    let mut latents = Vec::new();
    for split in [Split::HeldOut, Split::Train] {
        let mut recons = Vec::new();
        let mut refs = Vec::new();
        for start in (0..n).step_by(64) {
            let k = 64.min(n - start);
            let (_, images) = dataset::batch(&mut rng, split, k, size)?;
            let post = vae.encode(&images)?;
            recons.push(vae.decode(&post.mean)?);
            if split == Split::Train {
                let eps = super::gaussian(&mut rng, &post.mean.size())?;
                latents.push(post.mean.f_add(&post.std()?.f_mul(&eps)?)?);
            }
            refs.push(images);
        }
        result.push(psnr(
            &Tensor::f_cat(&recons, 0)?,
            &Tensor::f_cat(&refs, 0)?,
        )?);
    }
    let std = Tensor::f_cat(&latents, 0)?
        .f_std(true)?
        .f_double_value(&[])?;
    Ok((result[0], result[1], 1.0 / std.max(1e-6)))
}

/// The analytic checker's colour+shape accuracy on posterior-mean reconstructions of
/// held-out-combination images, for small and for large shapes: the ceiling the VAE puts on
/// the adherence of generated images.
pub fn checker_on_reconstructions(
    vae: &AutoencoderKL,
    recipe: &Recipe,
    seed: u64,
) -> Result<(f64, f64)> {
    use super::checker::{self, Target};
    let _g = tch::no_grad_guard();
    let size = recipe.image_size;
    let mut rng = Rng::derive(seed, streams::EVAL, 4);
    let mut counts = [(0usize, 0usize); 2];
    for _ in 0..recipe.figure_images.div_ceil(64) {
        let specs: Vec<dataset::Spec> = (0..64)
            .map(|_| dataset::Spec::sample(&mut rng, Split::HeldOut, size))
            .collect();
        let images: Vec<Vec<u8>> = specs.iter().map(dataset::render).collect();
        let x = dataset::to_tensor(&images, size)?;
        let y = vae.decode(&vae.encode(&x)?.mean)?;
        let bytes = y
            .f_clamp(-1.0, 1.0)?
            .f_add_scalar(1.0)?
            .f_mul_scalar(127.5)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_permute([0, 2, 3, 1])?
            .f_contiguous()?;
        let flat = Vec::<u8>::try_from(bytes.f_flatten(0, -1)?)?;
        for (i, spec) in specs.iter().enumerate() {
            let rgb = &flat[i * size * size * 3..(i + 1) * size * size * 3];
            let target = Target {
                colour: Some(spec.colour),
                shape: Some(spec.shape),
                cell: None,
            };
            let ok = checker::read(rgb, size).judge(&target).colour_and_shape();
            counts[spec.size].0 += ok as usize;
            counts[spec.size].1 += 1;
        }
    }
    let frac = |(ok, n): (usize, usize)| ok as f64 / n.max(1) as f64;
    Ok((frac(counts[0]), frac(counts[1])))
}
