//! The Stable Diffusion pipeline: loads a model folder and runs the one denoising loop that
//! every caller (CLI, C ABI, examples) goes through.
mod loader;

pub use loader::{LoadOptions, ModelFiles};

use crate::models::{AutoencoderKL, ClipTextTransformer, UNet2DConditionModel};
use crate::rng::PredrawnNoise;
use crate::schedulers::{self, Scheduler, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Largest number of images one call may generate.
pub const MAX_BATCH: usize = 64;
/// Largest number of denoising steps one call may run.
pub const MAX_STEPS: usize = 1000;
/// Largest side, in pixels, of a generated image.
pub const MAX_SIDE: i64 = 4096;

/// What to generate. `Default` gives diffusers' defaults where they exist.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// The unconditional text for classifier-free guidance; `None` means the empty prompt.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    /// Classifier-free guidance scale `w` in `uncond + w * (cond - uncond)`; `<= 1` runs the
    /// conditional pass alone.
    pub guidance: f64,
    pub seed: u64,
    /// Image size in pixels; `None` takes the UNet's native size.
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// Number of images generated for the prompt.
    pub batch: usize,
    /// Scheduler name (diffusers class or short name); `None` takes the model's own.
    pub scheduler: Option<String>,
    /// Text-encoder layers to skip from the end (diffusers' `clip_skip`), 0 = none.
    pub clip_skip: usize,
    /// DDIM's eta (0 = deterministic DDIM); ignored by schedulers without one.
    pub eta: f64,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            seed: 0,
            width: None,
            height: None,
            batch: 1,
            scheduler: None,
            clip_skip: 0,
            eta: 0.0,
        }
    }
}

/// What the per-step callback sees after each denoising step.
pub struct StepInfo<'a> {
    /// Steps completed so far, 1..=total.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    /// The current latents `[batch, channels, h/8, w/8]` (scaled as the UNet sees them).
    pub latents: &'a Tensor,
}

/// The callback's answer: go on, or stop the run with [`Error::Cancelled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Generated images: a float tensor `[batch, height, width, 3]` with values in [0, 1],
/// on the CPU (diffusers' `output_type="np"`).
pub struct Images {
    pub pixels: Tensor,
}

impl Images {
    pub fn len(&self) -> usize {
        self.pixels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn width(&self) -> u32 {
        self.pixels.size()[2] as u32
    }

    pub fn height(&self) -> u32 {
        self.pixels.size()[1] as u32
    }

    /// 8-bit RGB, row-major, one `Vec` per image, rounded as diffusers' `numpy_to_pil`
    /// (`(x * 255).round()`).
    pub fn to_rgb8(&self) -> Result<Vec<Vec<u8>>> {
        let bytes = self
            .pixels
            .f_mul_scalar(255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_contiguous()?;
        let per_image = (self.width() * self.height() * 3) as usize;
        let mut flat = vec![0u8; per_image * self.len()];
        let len = flat.len();
        bytes.f_copy_data_u8(&mut flat, len)?;
        Ok(flat.chunks(per_image).map(|c| c.to_vec()).collect())
    }
}

/// A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and scheduler config.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextTransformer,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    device: Device,
    kind: Kind,
}

impl StableDiffusion {
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Pixels per latent cell on each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.config().scale_factor()
    }

    /// The image size used when the caller gives none: the UNet's sample size in pixels.
    pub fn default_size(&self) -> i64 {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// A fresh scheduler: the named one, else the one the model's config names, else (a class
    /// this library lacks) DDIM with the config's values.
    pub fn scheduler(&self, name: Option<&str>) -> Result<Box<dyn Scheduler>> {
        match name {
            Some(n) => schedulers::scheduler_from_name(n, &self.scheduler_config),
            None => match schedulers::scheduler_from_config(&self.scheduler_config) {
                Err(Error::Unsupported(_)) => {
                    schedulers::scheduler_from_name("ddim", &self.scheduler_config)
                }
                other => other,
            },
        }
    }

    /// Text embeddings `[batch, tokens, dim]` for one prompt repeated `batch` times.
    pub fn encode_prompt(&self, prompt: &str, batch: usize, clip_skip: usize) -> Result<Tensor> {
        let ids = self.tokenizer.encode_padded(prompt);
        let ids = Tensor::from_slice(&ids)
            .f_unsqueeze(0)?
            .f_to_device(self.device)?;
        let hidden = self.text_encoder.forward(&ids, clip_skip)?;
        Ok(hidden.f_repeat([batch as i64, 1, 1])?)
    }

    fn check_params(&self, p: &GenerateParams) -> Result<(i64, i64)> {
        let width = p.width.unwrap_or_else(|| self.default_size());
        let height = p.height.unwrap_or_else(|| self.default_size());
        for (name, v) in [("width", width), ("height", height)] {
            if v <= 0 || v % 8 != 0 || v > MAX_SIDE {
                return Err(Error::invalid(format!(
                    "{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}"
                )));
            }
            if v % self.vae_scale_factor() != 0 {
                return Err(Error::invalid(format!(
                    "{name} {v} is not a multiple of the VAE's scale factor {}",
                    self.vae_scale_factor()
                )));
            }
        }
        if p.steps == 0 || p.steps > MAX_STEPS {
            return Err(Error::invalid(format!(
                "steps must be in 1..={MAX_STEPS}, got {}",
                p.steps
            )));
        }
        if p.batch == 0 || p.batch > MAX_BATCH {
            return Err(Error::invalid(format!(
                "batch must be in 1..={MAX_BATCH}, got {}",
                p.batch
            )));
        }
        if !p.guidance.is_finite() {
            return Err(Error::invalid(format!(
                "guidance must be a finite number, got {}",
                p.guidance
            )));
        }
        if !p.eta.is_finite() || p.eta < 0.0 {
            return Err(Error::invalid(format!("eta must be >= 0, got {}", p.eta)));
        }
        Ok((width, height))
    }

    /// Text to image. `on_step` runs after every denoising step and may cancel the run.
    pub fn txt2img(
        &self,
        params: &GenerateParams,
        mut on_step: Option<&mut dyn FnMut(&StepInfo) -> Control>,
    ) -> Result<Images> {
        let (width, height) = self.check_params(params)?;
        let _no_grad = tch::no_grad_guard();
        let mut scheduler = self.scheduler(params.scheduler.as_deref())?;
        scheduler.set_eta(params.eta)?;
        scheduler.set_timesteps(params.steps)?;

        let batch = params.batch as i64;
        let cfg = params.guidance > 1.0;
        let cond = self.encode_prompt(&params.prompt, params.batch, params.clip_skip)?;
        let context = if cfg {
            let negative = params.negative_prompt.as_deref().unwrap_or("");
            // diffusers applies clip_skip to the prompt only, not to the negative prompt.
            let uncond = self.encode_prompt(negative, params.batch, 0)?;
            Tensor::f_cat(&[uncond, cond], 0)?
        } else {
            cond
        };

        let vsf = self.vae_scale_factor();
        let channels = self.vae.config().latent_channels;
        let shape = vec![batch, channels, height / vsf, width / vsf];
        // All noise of the run, drawn up front in the reference's order: the initial latents,
        // then whatever the scheduler's steps draw.
        let mut shapes = vec![shape.clone()];
        shapes.extend(std::iter::repeat_n(shape.clone(), scheduler.noise_draws()));
        let mut noise = PredrawnNoise::draw(params.seed, &shapes, self.kind, self.device)?;
        let mut latents = crate::rng::NoiseSource::randn(&mut noise, &shape)?
            .f_mul_scalar(scheduler.init_noise_sigma())?;

        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = if cfg {
                Tensor::f_cat(&[&latents, &latents], 0)?
            } else {
                latents.shallow_clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, t)?;
            let mut pred = self.unet.forward(&model_input, t, &context)?;
            if cfg {
                let parts = pred.f_chunk(2, 0)?;
                let (uncond, cond) = (&parts[0], &parts[1]);
                pred = uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(params.guidance)?)?;
            }
            latents = scheduler.step(&pred, t, &latents, &mut noise)?;
            if let Some(cb) = on_step.as_mut() {
                let info = StepInfo {
                    step: i + 1,
                    total,
                    timestep: t,
                    latents: &latents,
                };
                if cb(&info) == Control::Cancel {
                    return Err(Error::Cancelled);
                }
            }
        }
        self.decode_latents(&latents)
    }

    /// Latents (as the UNet sees them) to images in [0, 1], `[batch, h, w, 3]` on the CPU.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Images> {
        let _no_grad = tch::no_grad_guard();
        let images = self.vae.decode(&self.vae.unscale_latents(latents)?)?;
        let pixels = images
            .f_div_scalar(2.0)?
            .f_add_scalar(0.5)?
            .f_clamp(0.0, 1.0)?
            .f_permute([0, 2, 3, 1])?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        Ok(Images { pixels })
    }
}
