//! Heun's second-order method on the probability-flow ODE (Karras et al., arXiv 2206.00364,
//! algorithm 1), equal to diffusers' `HeunDiscreteScheduler`.
use super::sigmas::{
    add_sigma_noise, denoised, init_noise_sigma, k_schedule, scale_input, sigma_at, train_sigmas,
    SigmaSchedule, StepIndex,
};
use super::{
    check_step_shapes, BetaSchedule, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainSchedule,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "HeunDiscreteScheduler";

/// State kept between the two halves of a Heun step.
struct FirstHalf {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// diffusers' `HeunDiscreteScheduler` (order 2: two model evaluations per noise level).
///
/// `set_timesteps(n)` gives 2n − 1 timesteps: t0, then every later timestep twice. An Euler
/// step from σ_i to σ_{i+1} (first half) is followed by the trapezoidal correction at σ_{i+1}
/// (second half); the last level is reached by a plain Euler step to σ = 0.
///
/// Defaults as in diffusers: 1000 training steps, **linear** betas 0.00085 → 0.012,
/// ε-prediction, `linspace` spacing, `clip_sample` false (range 1); Karras, exponential or beta
/// sigmas optional. `rescale_betas_zero_snr` is not a setting of this class and is ignored, as
/// diffusers ignores it.
pub struct HeunDiscreteScheduler {
    schedule: TrainSchedule,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_schedule: SigmaSchedule,
    clip_range: Option<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
    first_half: Option<FirstHalf>,
}

impl HeunDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let sigma_schedule = SigmaSchedule::from_config(config, CLASS)?;
        let schedule = TrainSchedule::from_config_without_zero_snr(
            config,
            (1000, 0.00085, 0.012, BetaSchedule::Linear),
            CLASS,
        )?;
        let clip_range = if config.clip_sample.unwrap_or(false) {
            let r = config.clip_sample_range.unwrap_or(1.0);
            if !(r.is_finite() && r >= 0.0) {
                return Err(Error::invalid(format!(
                    "clip_sample_range must be a finite number >= 0, got {r}"
                )));
            }
            Some(r)
        } else {
            None
        };
        let mut s = Self {
            train_sigmas: train_sigmas(&schedule.alphas_cumprod)?,
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            sigma_schedule,
            clip_range,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            first_half: None,
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

    /// The noise levels, aligned with `timesteps()` plus a final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// True between the two halves of a step.
    pub fn in_second_half(&self) -> bool {
        self.first_half.is_some()
    }
}

impl Scheduler for HeunDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps;
        let (timesteps, sigmas) = k_schedule(
            &self.train_sigmas,
            self.spacing,
            n_train,
            num_inference_steps,
            self.steps_offset,
            self.sigma_schedule,
            None,
            None,
        )?;
        let mut levels: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        levels.push(0.0);
        // σ0, then every inner level twice, then the final 0; t0, then every later t twice.
        let mut doubled = vec![levels[0]];
        for &s in &levels[1..levels.len() - 1] {
            doubled.extend([s, s]);
        }
        doubled.push(0.0);
        let mut ts = vec![timesteps[0] as f64];
        for &t in &timesteps[1..] {
            ts.extend([t as f64, t as f64]);
        }
        self.timesteps = ts;
        self.sigmas = doubled;
        self.first_half = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let i = self.index.current(&self.timesteps, timestep)?;
        let first = self.first_half.is_none();
        let (sigma, sigma_next) = if first {
            (sigma_at(&self.sigmas, i)?, sigma_at(&self.sigmas, i + 1)?)
        } else {
            let prev = i
                .checked_sub(1)
                .ok_or_else(|| Error::Internal("Heun second half at step index 0".to_string()))?;
            (sigma_at(&self.sigmas, prev)?, sigma_at(&self.sigmas, i)?)
        };
        self.index.init(&self.timesteps, timestep)?;

        let sigma_input = if first { sigma } else { sigma_next };
        let mut x0 = denoised(self.prediction, model_output, sample, sigma_input)?;
        if let Some(r) = self.clip_range {
            x0 = x0.f_clamp(-r, r)?;
        }

        let prev = match self.first_half.take() {
            None => {
                let derivative = sample.f_sub(&x0)?.f_div_scalar(sigma as f64)?;
                let dt = sigma_next - sigma;
                let prev = sample.f_add(&derivative.f_mul_scalar(dt as f64)?)?;
                self.first_half = Some(FirstHalf {
                    derivative,
                    dt,
                    sample: sample.shallow_clone(),
                });
                prev
            }
            Some(half) => {
                let derivative = sample.f_sub(&x0)?.f_div_scalar(sigma_next as f64)?;
                let derivative = half.derivative.f_add(&derivative)?.f_div_scalar(2.0)?;
                half.sample
                    .f_add(&derivative.f_mul_scalar(half.dt as f64)?)?
            }
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

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, index: usize) {
        self.index.set_begin_index(index);
    }
}
