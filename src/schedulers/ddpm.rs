//! DDPM (Ho et al., arXiv 2006.11239): ancestral sampling of the posterior q(x_{t−1} | x_t, x0),
//! equal to diffusers' `DDPMScheduler`.
use super::{
    check_step_shapes, discrete_timesteps, draw_noise_like, predicted_original, torch_sqrt,
    BetaSchedule, PredictionType, SampleClipping, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainSchedule, VarianceType,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "DDPMScheduler";

/// diffusers' `DDPMScheduler`.
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `variance_type` fixed_small, `clip_sample` true, `leading` spacing, `steps_offset` 0.
///
/// `fixed_large_log` is computed as its intended standard deviation exp(½ log β_t) = √β_t:
/// diffusers 0.42.1 takes the square root of log β_t there, which is NaN for every β_t < 1.
/// The learned variance types need a model that predicts its variance and are unsupported.
pub struct DdpmScheduler {
    schedule: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    variance: VarianceType,
    clipping: SampleClipping,
    timesteps_int: Vec<i64>,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            &[
                BetaSchedule::Linear,
                BetaSchedule::ScaledLinear,
                BetaSchedule::SquaredcosCapV2,
                BetaSchedule::Laplace,
                BetaSchedule::Sigmoid,
            ],
            CLASS,
        )?;
        let variance = config.variance_type.unwrap_or(VarianceType::FixedSmall);
        if matches!(variance, VarianceType::Learned | VarianceType::LearnedRange) {
            return Err(Error::Unsupported(format!(
                "{CLASS} variance_type {variance} (a model that predicts its variance); supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log"
            )));
        }
        // Before set_timesteps diffusers steps through every training timestep.
        let n = schedule.num_train_timesteps as i64;
        let timesteps_int: Vec<i64> = (0..n).rev().collect();
        Ok(Self {
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset.unwrap_or(0),
            variance,
            clipping: SampleClipping::from_config(config, true)?,
            timesteps: timesteps_int.iter().map(|&t| t as f64).collect(),
            timesteps_int,
            schedule,
        })
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The timestep after `t` in the current list, −1 after the last (diffusers'
    /// `previous_timestep`).
    fn previous_timestep(&self, t: i64) -> Result<i64> {
        let index = self
            .timesteps_int
            .iter()
            .position(|&x| x == t)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "timestep {t} is not one of the {} timesteps set by set_timesteps",
                    self.timesteps_int.len()
                ))
            })?;
        Ok(self.timesteps_int.get(index + 1).copied().unwrap_or(-1))
    }

    /// The standard deviation of the noise added at `t`, in diffusers' f32 arithmetic.
    fn noise_std(&self, alpha_prod_t: f32, alpha_prod_t_prev: f32) -> Result<f32> {
        let current_beta_t = 1.0 - alpha_prod_t / alpha_prod_t_prev;
        let mut variance = (1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t;
        if variance < 1e-20 {
            variance = 1e-20;
        }
        Ok(match self.variance {
            VarianceType::FixedSmall => torch_sqrt(variance)?,
            VarianceType::FixedSmallLog => exp_half_log(variance)?,
            VarianceType::FixedLarge => torch_sqrt(current_beta_t)?,
            VarianceType::FixedLargeLog => exp_half_log(current_beta_t)?,
            VarianceType::Learned | VarianceType::LearnedRange => {
                return Err(Error::Internal("learned variance reached step".into()))
            }
        })
    }
}

/// exp(0.5 · log v) through libtorch's float32 kernels, like diffusers.
fn exp_half_log(v: f32) -> Result<f32> {
    let t = Tensor::from(v).f_log()?.f_mul_scalar(0.5)?.f_exp()?;
    Ok(t.f_double_value(&[])? as f32)
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ts = discrete_timesteps(
            self.spacing,
            self.schedule.num_train_timesteps,
            num_inference_steps,
            self.steps_offset,
        )?;
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.timesteps_int = ts;
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
        check_step_shapes(model_output, sample)?;
        let t = self.schedule.index(timestep)?;
        let prev_t = self.previous_timestep(t as i64)?;

        let alpha_prod_t = self.schedule.alpha_cumprod(t);
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod(prev_t as usize)
        } else {
            1.0
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let x0 = predicted_original(self.prediction, model_output, sample, alpha_prod_t)?;
        let x0 = self.clipping.apply(x0)?;

        // Posterior mean, eq. 7 of the DDPM paper.
        let x0_coeff = torch_sqrt(alpha_prod_t_prev)? * current_beta_t / beta_prod_t;
        let sample_coeff = torch_sqrt(current_alpha_t)? * beta_prod_t_prev / beta_prod_t;
        let prev = x0
            .f_mul_scalar(x0_coeff as f64)?
            .f_add(&sample.f_mul_scalar(sample_coeff as f64)?)?;

        if t > 0 {
            let z = draw_noise_like(noise, model_output)?;
            let std = self.noise_std(alpha_prod_t, alpha_prod_t_prev)?;
            Ok(prev.f_add(&z.f_mul_scalar(std as f64)?)?)
        } else {
            Ok(prev)
        }
    }

    fn noise_draws(&self) -> usize {
        self.timesteps_int.iter().filter(|&&t| t > 0).count()
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, timestep)
    }
}
