//! Ancestral sampling with Euler steps (k-diffusion's `sample_euler_ancestral`), equal to
//! diffusers' `EulerAncestralDiscreteScheduler`.
use super::euler::euler_train_sigmas;
use super::sigmas::{
    add_sigma_noise, denoised, init_noise_sigma, k_schedule, scale_input, sigma_at, SigmaSchedule,
    StepIndex,
};
use super::{
    check_step_shapes, draw_noise_like, torch_sqrt, BetaSchedule, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing, TrainSchedule, COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::{Kind, Tensor};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// diffusers' `EulerAncestralDiscreteScheduler`: each step goes down to σ_down with an Euler
/// step and adds fresh noise of standard deviation σ_up, where σ_up² + σ_down² = σ_next² and
/// σ_up = σ_next √(σ² − σ_next²) / σ. One noise tensor is drawn per step (the last step too,
/// where σ_up = 0, as diffusers does).
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `linspace` spacing. `sample` prediction is not implemented in diffusers and unsupported.
pub struct EulerAncestralDiscreteScheduler {
    schedule: TrainSchedule,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let prediction = config.prediction_type.unwrap_or(PredictionType::Epsilon);
        if prediction == PredictionType::Sample {
            return Err(Error::Unsupported(format!(
                "{CLASS} prediction_type sample (not implemented in diffusers); supported: epsilon, v_prediction"
            )));
        }
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            COMMON_BETA_SCHEDULES,
            CLASS,
        )?;
        let train_sigmas =
            euler_train_sigmas(&schedule, config.rescale_betas_zero_snr.unwrap_or(false))?;
        let n = schedule.num_train_timesteps;
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(Self {
            prediction,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            sigmas,
            index: StepIndex::default(),
            train_sigmas,
            schedule,
        })
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The noise levels of the current schedule (one more than the timesteps, ending in 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (timesteps, sigmas) = k_schedule(
            &self.train_sigmas,
            self.spacing,
            self.schedule.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
            SigmaSchedule::Interpolated,
            None,
            None,
        )?;
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.sigmas = sigmas;
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_noise_sigma(&self.sigmas, self.spacing).unwrap_or(f64::NAN)
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep)?;
        scale_input(sample, sigma_at(&self.sigmas, i)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let i = self.index.current(&self.timesteps, timestep)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        let sigma_next = sigma_at(&self.sigmas, i + 1)?;
        self.index.init(&self.timesteps, timestep)?;

        let x = sample.f_to_kind(Kind::Float)?;
        let x0 = denoised(self.prediction, model_output, &x, sigma)?;

        let (from2, to2) = (sigma * sigma, sigma_next * sigma_next);
        let sigma_up = torch_sqrt(to2 * (from2 - to2) / from2)?;
        let sigma_down = torch_sqrt(to2 - sigma_up * sigma_up)?;

        let derivative = x.f_sub(&x0)?.f_div_scalar(sigma as f64)?;
        let dt = sigma_down - sigma;
        let prev = x.f_add(&derivative.f_mul_scalar(dt as f64)?)?;
        let z = draw_noise_like(noise, model_output)?;
        let prev = prev.f_add(&z.f_mul_scalar(sigma_up as f64)?)?;
        self.index.advance();
        Ok(prev.f_to_kind(model_output.kind())?)
    }

    /// One per remaining step: all timesteps, or those from the begin index on.
    fn noise_draws(&self) -> usize {
        let start = self.index.begin_index().unwrap_or(0);
        self.timesteps.len().saturating_sub(start)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.noise_index(&self.timesteps, timestep)?;
        add_sigma_noise(original, noise, sigma_at(&self.sigmas, i)?)
    }

    fn set_begin_index(&mut self, index: usize) {
        self.index.set_begin_index(index);
    }
}
