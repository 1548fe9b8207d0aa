//! Latent Consistency Models (Luo et al., arXiv 2310.04378): multistep consistency sampling,
//! equal to diffusers' `LCMScheduler`.
use super::dpm_common::{t_sqrt, Extra, StepCounter};
use super::{
    check_inference_steps, check_step_shapes, draw_noise_like, BetaSchedule, PredictionType,
    SampleClipping, Scheduler, SchedulerConfig, TrainSchedule, COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "LCMScheduler";

/// diffusers' `LCMScheduler`, for a UNet distilled with LCM (plain conditioning; UNets that
/// take a guidance embedding, `time_cond_proj_dim`, are not supported by the pipeline).
///
/// Defaults as in diffusers: 1000 training steps, scaled-linear betas 0.00085 → 0.012,
/// ε-prediction, `original_inference_steps` 50, `timestep_scaling` 10, `clip_sample` false,
/// `set_alpha_to_one` true.
///
/// The timesteps are `num_inference_steps` picked evenly (by index) from the
/// `original_inference_steps` distillation timesteps k·i − 1 (k = T / original steps); the
/// spacing settings do not apply. Each step maps the sample to the consistency function's
/// estimate `c_skip(t) x + c_out(t) x0` and, except after the last step, noises that estimate
/// to the next timestep with fresh noise (one draw per step but the last).
pub struct LcmScheduler {
    schedule: TrainSchedule,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    clipping: SampleClipping,
    original_inference_steps: usize,
    timestep_scaling: f32,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    counter: StepCounter,
}

impl LcmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.00085, 0.012, BetaSchedule::ScaledLinear),
            COMMON_BETA_SCHEDULES,
            CLASS,
        )?;
        let extra = Extra {
            config,
            class: CLASS,
        };
        let original_inference_steps = extra.usize("original_inference_steps", 50)?;
        if original_inference_steps == 0 {
            return Err(Error::invalid(format!(
                "{CLASS}: original_inference_steps must be at least 1, got 0"
            )));
        }
        let timestep_scaling = extra.f64("timestep_scaling")?.unwrap_or(10.0);
        if !timestep_scaling.is_finite() {
            return Err(Error::invalid(format!(
                "{CLASS}: timestep_scaling must be finite, got {timestep_scaling}"
            )));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alpha_cumprod(0)
        };
        let n = schedule.num_train_timesteps;
        Ok(Self {
            final_alpha_cumprod,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            clipping: SampleClipping::from_config(config, false)?,
            original_inference_steps,
            timestep_scaling: timestep_scaling as f32,
            num_inference_steps: None,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            counter: StepCounter::default(),
            schedule,
        })
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The boundary-condition scalings (c_skip, c_out) at a timestep, in float32 as diffusers
    /// computes them from the pipelines' int64 timestep tensors (σ_data = 0.5).
    pub fn boundary_scalings(&self, timestep: f64) -> Result<(f32, f32)> {
        let scaled = timestep as f32 * self.timestep_scaling;
        let denom = scaled * scaled + 0.25;
        let c_skip = (1.0 / denom) * 0.25;
        // `** 0.5` of a 0-dim float32 tensor: libtorch's sqrt, which is not always correctly
        // rounded (e.g. √2528100.25 gives 1590), so not `f32::sqrt`.
        let c_out = scaled / t_sqrt(denom)?;
        Ok((c_skip, c_out))
    }

    /// ᾱ at the timestep `t`, or the final ᾱ for a negative one.
    fn alpha_prod(&self, t: f64) -> Result<f32> {
        if t < 0.0 {
            Ok(self.final_alpha_cumprod)
        } else {
            Ok(self.schedule.alpha_cumprod(self.schedule.index(t)?))
        }
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps;
        check_inference_steps(num_inference_steps, n_train)?;
        let original = self.original_inference_steps;
        if original > n_train {
            return Err(Error::invalid(format!(
                "{CLASS}: original_inference_steps ({original}) cannot be larger than num_train_timesteps ({n_train})"
            )));
        }
        if num_inference_steps > original {
            return Err(Error::invalid(format!(
                "{CLASS}: num_inference_steps ({num_inference_steps}) cannot be larger than original_inference_steps ({original})"
            )));
        }
        let k = (n_train / original) as i64;
        // The distillation timesteps k·i − 1, i = original … 1.
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let n = num_inference_steps;
        // np.linspace(0, len, n, endpoint=False), floored.
        let step = origin.len() as f64 / n as f64;
        self.timesteps = (0..n)
            .map(|i| origin[((i as f64) * step).floor() as usize] as f64)
            .collect();
        self.num_inference_steps = Some(n);
        self.counter = StepCounter::default();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.shallow_clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let num_steps = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: step called before set_timesteps")))?;
        check_step_shapes(model_output, sample)?;
        let timesteps = &self.timesteps;
        let i = self.counter.init(|| {
            super::sigmas::index_for_timestep(timesteps, timestep).ok_or_else(|| {
                Error::invalid(format!(
                    "{CLASS}: timestep {timestep} is not one of the {} timesteps set by set_timesteps",
                    timesteps.len()
                ))
            })
        })?;
        let prev_timestep = match self.timesteps.get(i + 1) {
            Some(&t) => t,
            None => timestep,
        };
        let alpha_prod_t = self.alpha_prod(timestep)?;
        let alpha_prod_t_prev = self.alpha_prod(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (c_skip, c_out) = self.boundary_scalings(timestep)?;

        let x0 = match self.prediction {
            PredictionType::Epsilon => sample
                .f_sub(&model_output.f_mul_scalar(t_sqrt(beta_prod_t)? as f64)?)?
                .f_div_scalar(t_sqrt(alpha_prod_t)? as f64)?,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample
                .f_mul_scalar(t_sqrt(alpha_prod_t)? as f64)?
                .f_sub(&model_output.f_mul_scalar(t_sqrt(beta_prod_t)? as f64)?)?,
        };
        let x0 = self.clipping.apply(x0)?;
        let denoised = x0
            .f_mul_scalar(c_out as f64)?
            .f_add(&sample.f_mul_scalar(c_skip as f64)?)?;

        let prev = if i + 1 != num_steps {
            let z = draw_noise_like(noise, &denoised)?;
            denoised
                .f_mul_scalar(t_sqrt(alpha_prod_t_prev)? as f64)?
                .f_add(&z.f_mul_scalar(t_sqrt(beta_prod_t_prev)? as f64)?)?
        } else {
            denoised
        };
        self.counter.advance();
        Ok(prev)
    }

    fn noise_draws(&self) -> usize {
        self.timesteps.len().saturating_sub(1)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, timestep)
    }

    fn set_begin_index(&mut self, index: usize) {
        self.counter.begin_index = Some(index);
    }
}
