//! Linear multistep sampling in σ (k-diffusion's `sample_lms`), equal to diffusers'
//! `LMSDiscreteScheduler`.
use super::sigmas::{
    add_sigma_noise, denoised, init_noise_sigma, k_schedule, scale_input, sigma_at, train_sigmas,
    SigmaSchedule, StepIndex,
};
use super::{
    check_step_shapes, BetaSchedule, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainSchedule,
};
use crate::rng::NoiseSource;
use crate::Result;
use std::collections::VecDeque;
use tch::Tensor;

const CLASS: &str = "LMSDiscreteScheduler";

/// The most derivatives the multistep formula combines (diffusers' default `order=4`).
const LMS_ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler` with its default order 4.
///
/// Each step integrates the Lagrange polynomial through the last (up to four) derivatives
/// dx/dσ over [σ_i, σ_{i+1}]. diffusers integrates with `scipy.integrate.quad` on an integrand
/// evaluated in float32; here the integral is exact (three-point Gauss–Legendre, exact for the
/// cubic basis polynomials, in float64), which agrees to about 1e-7 relative.
///
/// As in diffusers, the polynomial order is min(step index + 1, 4) even when fewer
/// derivatives have been collected (a run started mid-schedule with `set_begin_index`); the
/// missing ones are simply left out of the sum.
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `linspace` spacing; Karras / exponential / beta sigmas optional. `rescale_betas_zero_snr`
/// is not a setting of this class and is ignored, as diffusers ignores it.
pub struct LmsDiscreteScheduler {
    schedule: TrainSchedule,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_schedule: SigmaSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
    derivatives: VecDeque<Tensor>,
}

impl LmsDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let sigma_schedule = SigmaSchedule::from_config(config, CLASS)?;
        let schedule = TrainSchedule::from_config_without_zero_snr(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            CLASS,
        )?;
        let mut s = Self {
            train_sigmas: train_sigmas(&schedule.alphas_cumprod)?,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            sigma_schedule,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            derivatives: VecDeque::new(),
            schedule,
        };
        // diffusers' constructor runs set_timesteps over every training timestep.
        let n = s.schedule.num_train_timesteps;
        s.set_timesteps(n)?;
        Ok(s)
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The noise levels of the current schedule (one more than the timesteps, ending in 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// ∫ from σ_t to σ_{t+1} of the Lagrange basis polynomial that is 1 at σ_{t−current} and
    /// 0 at the other σ_{t−k}, k < order.
    fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.sigmas[i] as f64;
        let basis = |tau: f64| -> f64 {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product()
        };
        gauss_legendre_3(basis, s(t), s(t + 1))
    }
}

/// ∫_a^b f by three-point Gauss–Legendre quadrature: exact for polynomials of degree ≤ 5.
fn gauss_legendre_3(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let mid = 0.5 * (a + b);
    let half = 0.5 * (b - a);
    let node = (3.0f64 / 5.0).sqrt() * half;
    half * ((5.0 / 9.0) * (f(mid - node) + f(mid + node)) + (8.0 / 9.0) * f(mid))
}

impl Scheduler for LmsDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (timesteps, sigmas) = k_schedule(
            &self.train_sigmas,
            self.spacing,
            self.schedule.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
            self.sigma_schedule,
            None,
            None,
        )?;
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.sigmas = sigmas;
        self.index.reset();
        self.derivatives.clear();
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let t = self.index.current(&self.timesteps, timestep)?;
        let sigma = sigma_at(&self.sigmas, t)?;
        sigma_at(&self.sigmas, t + 1)?;
        self.index.init(&self.timesteps, timestep)?;

        let x0 = denoised(self.prediction, model_output, sample, sigma)?;
        let derivative = sample.f_sub(&x0)?.f_div_scalar(sigma as f64)?;
        self.derivatives.push_back(derivative);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.pop_front();
        }
        let order = (t + 1).min(LMS_ORDER);
        // Σ coeff_k · derivative_k, newest derivative first, summed left to right.
        let mut sum: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = d.f_mul_scalar(self.lms_coefficient(order, t, current))?;
            sum = Some(match sum {
                None => term,
                Some(acc) => acc.f_add(&term)?,
            });
        }
        let prev = match sum {
            Some(s) => sample.f_add(&s)?,
            None => sample.shallow_clone(),
        };
        self.index.advance();
        Ok(prev)
    }

    fn noise_draws(&self) -> usize {
        0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.noise_index(&self.timesteps, timestep)?;
        add_sigma_noise(original, noise, sigma_at(&self.sigmas, i)?)
    }

    fn set_begin_index(&mut self, index: usize) {
        self.index.set_begin_index(index);
    }
}
