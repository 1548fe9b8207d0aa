//! Euler's method on the probability-flow ODE in the k-diffusion parametrisation (Karras et
//! al., arXiv 2206.00364, algorithm 2 without churn), equal to diffusers'
//! `EulerDiscreteScheduler`.
use super::sigmas::{
    add_sigma_noise, denoised, extra_choice, extra_f64, init_noise_sigma, k_schedule, retime,
    scale_input, sigma_at, spaced_timesteps, train_sigmas, SigmaSchedule, StepIndex,
};
use super::{
    check_step_shapes, BetaSchedule, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    TrainSchedule, COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

const CLASS: &str = "EulerDiscreteScheduler";

/// The ᾱ that diffusers substitutes for the last (zero) one of a zero-terminal-SNR schedule,
/// so that σ_T = √((1 − ᾱ)/ᾱ) stays finite (≈ 4096).
pub(crate) const ZERO_SNR_ALPHA_CUMPROD: f32 = 1.0 / 16_777_216.0;

/// The training σ of a config, with the zero-terminal-SNR substitution of the Euler
/// schedulers.
pub(crate) fn euler_train_sigmas(schedule: &TrainSchedule, zero_snr: bool) -> Result<Vec<f32>> {
    let ac = schedule.alphas_cumprod.f_to_kind(Kind::Float)?.copy();
    if zero_snr {
        let n = ac.size()[0];
        let _ = ac.f_get(n - 1)?.f_fill_(ZERO_SNR_ALPHA_CUMPROD as f64)?;
    }
    train_sigmas(&ac)
}

/// How the noise levels between training timesteps are found (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interpolation {
    /// Linear in σ at the spaced timesteps.
    Linear,
    /// n + 1 levels evenly spaced in log σ between the training extremes.
    LogLinear,
}

/// diffusers' `EulerDiscreteScheduler` with `s_churn` = 0 (the pipelines' default: no noise).
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `linspace` spacing, `interpolation_type` linear, `timestep_type` discrete,
/// `final_sigmas_type` zero, no Karras / exponential / beta sigmas. `sigma_min` / `sigma_max`
/// bound the Karras, exponential and beta schedules.
///
/// The step counter follows diffusers: it starts at the index set by `set_begin_index`, else at
/// the position of the first timestep passed, and advances by one per `step`.
pub struct EulerDiscreteScheduler {
    schedule: TrainSchedule,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_schedule: SigmaSchedule,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    interpolation: Interpolation,
    continuous: bool,
    final_sigma_min: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let sigma_schedule = SigmaSchedule::from_config(config, CLASS)?;
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            COMMON_BETA_SCHEDULES,
            CLASS,
        )?;
        let zero_snr = config.rescale_betas_zero_snr.unwrap_or(false);
        let train_sigmas = euler_train_sigmas(&schedule, zero_snr)?;
        let sigma_min = extra_f64(config, "sigma_min", CLASS)?;
        let sigma_max = extra_f64(config, "sigma_max", CLASS)?;
        for (name, v) in [("sigma_min", sigma_min), ("sigma_max", sigma_max)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::invalid(format!(
                        "{CLASS}: {name} must be a finite number > 0, got {v}"
                    )));
                }
            }
        }
        let prediction = config.prediction_type.unwrap_or(PredictionType::Epsilon);
        let continuous = extra_choice(
            config,
            "timestep_type",
            "discrete",
            &["discrete", "continuous"],
            CLASS,
        )? == "continuous"
            && prediction == PredictionType::VPrediction;
        let interpolation = match extra_choice(
            config,
            "interpolation_type",
            "linear",
            &["linear", "log_linear"],
            CLASS,
        )? {
            "log_linear" => Interpolation::LogLinear,
            _ => Interpolation::Linear,
        };
        let final_sigma_min = extra_choice(
            config,
            "final_sigmas_type",
            "zero",
            &["zero", "sigma_min"],
            CLASS,
        )? == "sigma_min";
        let mut s = Self {
            prediction,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            sigma_schedule,
            sigma_min,
            sigma_max,
            interpolation,
            continuous,
            final_sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            index: StepIndex::default(),
            train_sigmas,
            schedule,
        };
        // Before set_timesteps: every training timestep, σ descending, then 0.
        let n = s.schedule.num_train_timesteps;
        let mut sigmas: Vec<f32> = s.train_sigmas.iter().rev().copied().collect();
        s.timesteps = if continuous {
            quarter_log(&sigmas)?
        } else {
            (0..n).rev().map(|t| t as f64).collect()
        };
        sigmas.push(0.0);
        s.sigmas = sigmas;
        Ok(s)
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The noise levels of the current schedule (one more than the timesteps, ending in the
    /// final σ).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The index the next `step` will use, once a step (or begin index) fixed it.
    pub fn step_index(&self) -> Option<usize> {
        self.index.step_index()
    }
}

/// diffusers' continuous v-prediction timesteps: 0.25 · ln σ (float32).
fn quarter_log(sigmas: &[f32]) -> Result<Vec<f64>> {
    let t = Tensor::f_from_slice(sigmas)?.f_log()?.f_mul_scalar(0.25)?;
    Ok(Vec::<f32>::try_from(&t)?
        .into_iter()
        .map(|v| v as f64)
        .collect())
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps;
        let n = num_inference_steps;
        let (timesteps, sigmas) = match self.interpolation {
            Interpolation::Linear => k_schedule(
                &self.train_sigmas,
                self.spacing,
                n_train,
                n,
                self.steps_offset,
                self.sigma_schedule,
                self.sigma_min,
                self.sigma_max,
            )?,
            Interpolation::LogLinear => {
                // n + 1 levels evenly spaced in log σ between the training extremes (torch
                // float32 linspace), then the optional Karras / ... conversion.
                let timesteps = spaced_timesteps(self.spacing, n_train, n, self.steps_offset)?;
                let ts = &self.train_sigmas;
                let hi = (ts[ts.len() - 1] as f64).ln() as f32;
                let lo = (ts[0] as f64).ln() as f32;
                let levels = Tensor::f_linspace(
                    hi as f64,
                    lo as f64,
                    n as i64 + 1,
                    (Kind::Float, Device::Cpu),
                )?
                .f_exp()?;
                let levels: Vec<f64> = Vec::<f32>::try_from(&levels)?
                    .into_iter()
                    .map(|v| v as f64)
                    .collect();
                if self.sigma_schedule == SigmaSchedule::Interpolated {
                    (timesteps, levels)
                } else {
                    let sigmas =
                        self.sigma_schedule
                            .convert(&levels, n, self.sigma_min, self.sigma_max);
                    (retime(&sigmas, &self.train_sigmas), sigmas)
                }
            }
        };
        let last = if self.final_sigma_min {
            self.train_sigmas[0]
        } else {
            0.0
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);
        self.timesteps = if self.continuous {
            quarter_log(&sigmas[..sigmas.len() - 1])?
        } else {
            timesteps.into_iter().map(|t| t as f64).collect()
        };
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step_shapes(model_output, sample)?;
        let i = self.index.current(&self.timesteps, timestep)?;
        let sigma = sigma_at(&self.sigmas, i)?;
        let sigma_next = sigma_at(&self.sigmas, i + 1)?;
        self.index.init(&self.timesteps, timestep)?;
        // diffusers steps in float32 and casts back to the model output's dtype.
        let x = sample.f_to_kind(Kind::Float)?;
        let x0 = denoised(self.prediction, model_output, &x, sigma)?;
        let derivative = x.f_sub(&x0)?.f_div_scalar(sigma as f64)?;
        let dt = sigma_next - sigma;
        let prev = x.f_add(&derivative.f_mul_scalar(dt as f64)?)?;
        self.index.advance();
        Ok(prev.f_to_kind(model_output.kind())?)
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
