//! DDIM (Song et al., arXiv 2010.02502), equal to diffusers' `DDIMScheduler`.
use super::{
    check_eta, check_step_shapes, discrete_timesteps, draw_noise_like,
    predicted_original_and_epsilon, torch_sqrt, BetaSchedule, PredictionType, SampleClipping,
    Scheduler, SchedulerConfig, TimestepSpacing, TrainSchedule, COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "DDIMScheduler";

/// diffusers' `DDIMScheduler`, with the pipelines' `eta` (η) as a setting.
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `clip_sample` true, `set_alpha_to_one` true, `leading` spacing, `steps_offset` 0, η = 0.
///
/// As in diffusers, the previous timestep is always `t − num_train_timesteps /
/// num_inference_steps` (integer division), whatever the spacing; below 0 the "final" ᾱ is
/// used: 1 with `set_alpha_to_one`, else ᾱ_0. η > 0 adds σ_t z with fresh noise every step.
pub struct DdimScheduler {
    schedule: TrainSchedule,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    clipping: SampleClipping,
    eta: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// A DDIM scheduler with η = 0 (deterministic).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            COMMON_BETA_SCHEDULES,
            CLASS,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alpha_cumprod(0)
        };
        let n = schedule.num_train_timesteps;
        Ok(Self {
            final_alpha_cumprod,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset.unwrap_or(0),
            clipping: SampleClipping::from_config(config, true)?,
            eta: 0.0,
            num_inference_steps: None,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            schedule,
        })
    }

    /// The same with η set.
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        Scheduler::set_eta(&mut self, eta)?;
        Ok(self)
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = discrete_timesteps(
            self.spacing,
            self.schedule.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        )?;
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
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
        let steps = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid("DDIM step called before set_timesteps".to_string()))?;
        check_step_shapes(model_output, sample)?;
        let t = self.schedule.index(timestep)?;
        let prev_t = t as i64 - (self.schedule.num_train_timesteps / steps) as i64;

        let alpha_prod_t = self.schedule.alpha_cumprod(t);
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod(prev_t as usize)
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;

        let (x0, eps) =
            predicted_original_and_epsilon(self.prediction, model_output, sample, alpha_prod_t)?;
        let x0 = self.clipping.apply(x0)?;

        // σ_t of eq. 16, scaled by η.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta as f32 * torch_sqrt(variance)?;

        // Eq. 12: √ᾱ_prev x0 + √(1 − ᾱ_prev − σ²) ε (+ σ z).
        let direction_coeff = torch_sqrt(1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t)?;
        let direction = eps.f_mul_scalar(direction_coeff as f64)?;
        let prev = x0
            .f_mul_scalar(torch_sqrt(alpha_prod_t_prev)? as f64)?
            .f_add(&direction)?;

        if self.eta > 0.0 {
            let z = draw_noise_like(noise, model_output)?;
            Ok(prev.f_add(&z.f_mul_scalar(std_dev_t as f64)?)?)
        } else {
            Ok(prev)
        }
    }

    fn noise_draws(&self) -> usize {
        if self.eta > 0.0 {
            self.timesteps.len()
        } else {
            0
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, timestep)
    }

    fn set_eta(&mut self, eta: f64) -> Result<()> {
        check_eta(eta)?;
        self.eta = eta;
        Ok(())
    }
}
