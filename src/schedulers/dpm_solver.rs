//! DPM-Solver++ (Lu et al., arXiv 2211.01095) in its multistep form, equal to diffusers'
//! `DPMSolverMultistepScheduler`: "DPM++ 2M" (and 1M / 3M), "DPM++ 2M SDE", with or without
//! Karras sigmas.
use super::dpm_common::{
    alpha_sigma, check_timestep_range, lambda, multistep_step_index, multistep_timesteps,
    recent_output, t_exp, t_sqrt, timesteps_of_sigmas, vp_data_prediction, Extra, StepCounter,
    VpTable,
};
use super::sigmas::{self, SigmaSchedule};
use super::{
    check_inference_steps, draw_noise_like, np_linspace, BetaSchedule, PredictionType,
    SampleClipping, Scheduler, SchedulerConfig, TimestepSpacing, TrainSchedule, VarianceType,
    COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::{Kind, Tensor};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// Which solver family: the deterministic DPM-Solver++ or its SDE variant, which injects fresh
/// noise every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// `"dpmsolver++"` (also what diffusers makes of `"deis"`).
    DpmSolverPlusPlus,
    /// `"sde-dpmsolver++"`.
    SdeDpmSolverPlusPlus,
}

/// The second-order update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmSolverType {
    Midpoint,
    Heun,
}

/// How the inference noise levels are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigmaSpacing {
    /// Training σ at the spaced timesteps.
    Interpolated,
    Karras,
    Exponential,
    Beta,
    /// Uniform in λ (log-SNR), `use_lu_lambdas`.
    Lu,
}

/// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type` `dpmsolver++` or
/// `sde-dpmsolver++`.
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `solver_order` 2, `solver_type` midpoint, `lower_order_final` true, `euler_at_final` false,
/// `final_sigmas_type` zero, `lambda_min_clipped` −∞, `linspace` spacing, `steps_offset` 0.
///
/// The timesteps are integers; with Karras / Lu / exponential / beta noise levels they are
/// the training timesteps nearest to each σ (diffusers' log-σ interpolation, rounded except
/// for the cosine schedule, where they are truncated). The step index starts at the begin
/// index when one is set (img2img), else at the position of the first timestep passed to
/// [`Scheduler::step`] (the second position when it occurs twice); `add_noise` follows the
/// same rules. The deprecated `dpmsolver` / `sde-dpmsolver` algorithms, flow matching and
/// models that predict their variance are not supported.
pub struct DpmSolverMultistepScheduler {
    schedule: TrainSchedule,
    table: VpTable,
    prediction: PredictionType,
    algorithm: DpmAlgorithm,
    solver_type: DpmSolverType,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    sigma_spacing: SigmaSpacing,
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    spacing: TimestepSpacing,
    steps_offset: i64,
    cosine: bool,
    thresholding: SampleClipping,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    counter: StepCounter,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = TrainSchedule::from_config(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            COMMON_BETA_SCHEDULES,
            CLASS,
        )?;
        let extra = Extra {
            config,
            class: CLASS,
        };
        let solver_order = extra.usize("solver_order", 2)?;
        if solver_order == 0 {
            return Err(Error::invalid(format!(
                "{CLASS}: solver_order must be at least 1, got 0"
            )));
        }
        let algorithm_name = extra.choice(
            "algorithm_type",
            "dpmsolver++",
            &[
                "dpmsolver++",
                "sde-dpmsolver++",
                "deis",
                "dpmsolver",
                "sde-dpmsolver",
            ],
        )?;
        let algorithm = match algorithm_name {
            "dpmsolver++" | "deis" => DpmAlgorithm::DpmSolverPlusPlus,
            "sde-dpmsolver++" => DpmAlgorithm::SdeDpmSolverPlusPlus,
            other => {
                return Err(Error::Unsupported(format!(
                    "{CLASS}: algorithm_type {other:?} (deprecated in diffusers) is not supported; use dpmsolver++ or sde-dpmsolver++"
                )))
            }
        };
        let solver_type = match extra.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )? {
            "heun" => DpmSolverType::Heun,
            // diffusers maps the other solvers' names to midpoint.
            _ => DpmSolverType::Midpoint,
        };
        let final_sigma_min =
            extra.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        // diffusers checks the algorithm as written, so "deis" needs sigma_min too.
        if algorithm_name == "deis" && !final_sigma_min {
            return Err(Error::invalid(format!(
                "{CLASS}: final_sigmas_type zero is not supported for algorithm_type deis; choose sigma_min"
            )));
        }
        let mut sigma_spacing = match SigmaSchedule::from_config(config, CLASS)? {
            SigmaSchedule::Interpolated => SigmaSpacing::Interpolated,
            SigmaSchedule::Karras => SigmaSpacing::Karras,
            SigmaSchedule::Exponential => SigmaSpacing::Exponential,
            SigmaSchedule::Beta => SigmaSpacing::Beta,
        };
        // diffusers tests use_karras_sigmas before use_lu_lambdas.
        if extra.bool("use_lu_lambdas", false)? && sigma_spacing == SigmaSpacing::Interpolated {
            sigma_spacing = SigmaSpacing::Lu;
        }
        extra.reject_flag("use_flow_sigmas")?;
        extra.reject_flag("use_dynamic_shifting")?;
        if let Some(v @ (VarianceType::Learned | VarianceType::LearnedRange)) = config.variance_type
        {
            return Err(Error::Unsupported(format!(
                "{CLASS}: variance_type {v} (a model that predicts its variance)"
            )));
        }
        let lambda_min_clipped = extra
            .f64("lambda_min_clipped")?
            .unwrap_or(f64::NEG_INFINITY);
        if lambda_min_clipped.is_nan() {
            return Err(Error::invalid(format!(
                "{CLASS}: lambda_min_clipped must be a number"
            )));
        }
        let thresholding = if config.thresholding.unwrap_or(false) {
            SampleClipping::from_config(config, false)?
        } else {
            SampleClipping::None
        };
        let zero_snr = config.rescale_betas_zero_snr.unwrap_or(false);
        let table = VpTable::new(&schedule, zero_snr)?;
        // diffusers tests the config's beta_schedule, even when trained_betas replace it.
        let cosine = config.beta_schedule == Some(BetaSchedule::SquaredcosCapV2);
        let n = schedule.num_train_timesteps;
        Ok(Self {
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            algorithm,
            solver_type,
            solver_order,
            lower_order_final: extra.bool("lower_order_final", true)?,
            euler_at_final: extra.bool("euler_at_final", false)?,
            sigma_spacing,
            final_sigma_min,
            lambda_min_clipped,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            cosine,
            thresholding,
            num_inference_steps: None,
            // Before set_timesteps, as in diffusers: every training timestep, the training σ.
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            sigmas: table.sigmas.clone(),
            model_outputs: (0..solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
            counter: StepCounter::default(),
            table,
            schedule,
        })
    }

    /// The noise levels of the current schedule: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn algorithm(&self) -> DpmAlgorithm {
        self.algorithm
    }

    pub fn solver_order(&self) -> usize {
        self.solver_order
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// The last usable training timestep + 1 once λ(t) is clipped at `lambda_min_clipped`
    /// (diffusers' `searchsorted` over the flipped λ table).
    fn last_timestep(&self) -> Result<usize> {
        let ac = &self.table.alphas_cumprod;
        let lambdas = ac
            .f_sqrt()?
            .f_log()?
            .f_sub(&ac.f_rsub_scalar(1.0)?.f_sqrt()?.f_log()?)?;
        let lambdas = Vec::<f32>::try_from(&lambdas)?;
        let clip = self.lambda_min_clipped as f32;
        let clipped = lambdas.iter().rev().take_while(|&&l| l < clip).count();
        Ok(self.schedule.num_train_timesteps - clipped)
    }

    /// The timesteps and (float64) noise levels of a run of `n` steps.
    fn schedule_for(&self, n: usize) -> Result<(Vec<i64>, Vec<f64>)> {
        let n_train = self.schedule.num_train_timesteps;
        let train = &self.table.sigmas;
        let logs = &self.table.log_sigmas;
        let to_t = |sig: &[f64], round: bool| timesteps_of_sigmas(sig, logs, round);
        let (sigma_min, sigma_max) = (train[0] as f64, train[n_train - 1] as f64);
        let round = !self.cosine;
        Ok(match self.sigma_spacing {
            SigmaSpacing::Interpolated => {
                let ts = multistep_timesteps(
                    self.spacing,
                    n_train,
                    self.last_timestep()?,
                    n,
                    self.steps_offset,
                );
                check_timestep_range(CLASS, &ts, n, n_train, self.spacing, self.steps_offset)?;
                let sig = ts.iter().map(|&t| train[t as usize] as f64).collect();
                (ts, sig)
            }
            SigmaSpacing::Karras => {
                let sig = sigmas::karras_sigmas(sigma_min, sigma_max, n);
                (to_t(&sig, round), sig)
            }
            SigmaSpacing::Lu => {
                let (lo, hi) = (logs[0] as f64, logs[n_train - 1] as f64);
                let sig: Vec<f64> = np_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (hi + r * (lo - hi)).exp())
                    .collect();
                (to_t(&sig, round), sig)
            }
            SigmaSpacing::Exponential => {
                let sig = sigmas::exponential_sigmas(sigma_min, sigma_max, n);
                (to_t(&sig, false), sig)
            }
            SigmaSpacing::Beta => {
                let sig = sigmas::beta_sigmas(sigma_min, sigma_max, n, 0.6, 0.6);
                (to_t(&sig, false), sig)
            }
        })
    }

    /// The data prediction x0 (DPM-Solver++ works on x0).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigmas::sigma_at(&self.sigmas, i)?)?;
        let x0 = vp_data_prediction(self.prediction, model_output, sample, alpha_t, sigma_t)?;
        self.thresholding.apply(x0)
    }

    /// (α, σ, λ) at `sigmas[index]`.
    fn level(&self, index: usize) -> Result<(f32, f32, f32)> {
        let (a, s) = alpha_sigma(sigmas::sigma_at(&self.sigmas, index)?)?;
        Ok((a, s, lambda(a, s)?))
    }

    /// The SDE noise term σ_t √(1 − e^{−2h}) z.
    fn noise_term(sigma_t: f32, h: f32, z: &Tensor) -> Result<Tensor> {
        let c = sigma_t * t_sqrt(1.0 - t_exp(-2.0 * h)?)?;
        Ok(z.f_mul_scalar(c as f64)?)
    }

    /// First order (DDIM-like) step from `sigmas[i]` to `sigmas[i + 1]`.
    fn first_order(
        &self,
        i: usize,
        x0: &Tensor,
        sample: &Tensor,
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.level(i + 1)?;
        let (_, sigma_s, lambda_s) = self.level(i)?;
        let h = lambda_t - lambda_s;
        match (self.algorithm, z) {
            (DpmAlgorithm::DpmSolverPlusPlus, _) => Ok(sample
                .f_mul_scalar((sigma_t / sigma_s) as f64)?
                .f_sub(&x0.f_mul_scalar((alpha_t * (t_exp(-h)? - 1.0)) as f64)?)?),
            (DpmAlgorithm::SdeDpmSolverPlusPlus, Some(z)) => {
                let e2 = t_exp(-2.0 * h)?;
                Ok(sample
                    .f_mul_scalar((sigma_t / sigma_s * t_exp(-h)?) as f64)?
                    .f_add(&x0.f_mul_scalar((alpha_t * (1.0 - e2)) as f64)?)?
                    .f_add(&Self::noise_term(sigma_t, h, z)?)?)
            }
            _ => Err(Error::Internal("SDE step without noise".into())),
        }
    }

    /// Second-order multistep update from the last two data predictions.
    fn second_order(&self, i: usize, sample: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.level(i + 1)?;
        let (_, sigma_s0, lambda_s0) = self.level(i)?;
        let (_, _, lambda_s1) = self.level(i - 1)?;
        let m0 = self.output(1)?;
        let m1 = self.output(2)?;
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = m0.f_sub(m1)?.f_mul_scalar((1.0 / r0) as f64)?;
        let em = t_exp(-h)? - 1.0;
        match (self.algorithm, z) {
            (DpmAlgorithm::DpmSolverPlusPlus, _) => {
                let base = sample
                    .f_mul_scalar((sigma_t / sigma_s0) as f64)?
                    .f_sub(&d0.f_mul_scalar((alpha_t * em) as f64)?)?;
                Ok(match self.solver_type {
                    DpmSolverType::Midpoint => {
                        base.f_sub(&d1.f_mul_scalar((0.5 * (alpha_t * em)) as f64)?)?
                    }
                    DpmSolverType::Heun => {
                        base.f_add(&d1.f_mul_scalar((alpha_t * (em / h + 1.0)) as f64)?)?
                    }
                })
            }
            (DpmAlgorithm::SdeDpmSolverPlusPlus, Some(z)) => {
                let one_m_e2 = 1.0 - t_exp(-2.0 * h)?;
                let base = sample
                    .f_mul_scalar((sigma_t / sigma_s0 * t_exp(-h)?) as f64)?
                    .f_add(&d0.f_mul_scalar((alpha_t * one_m_e2) as f64)?)?;
                let c1 = match self.solver_type {
                    DpmSolverType::Midpoint => 0.5 * (alpha_t * one_m_e2),
                    DpmSolverType::Heun => alpha_t * (one_m_e2 / (-2.0 * h) + 1.0),
                };
                Ok(base
                    .f_add(&d1.f_mul_scalar(c1 as f64)?)?
                    .f_add(&Self::noise_term(sigma_t, h, z)?)?)
            }
            _ => Err(Error::Internal("SDE step without noise".into())),
        }
    }

    /// Third-order multistep update from the last three data predictions.
    fn third_order(&self, i: usize, sample: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.level(i + 1)?;
        let (_, sigma_s0, lambda_s0) = self.level(i)?;
        let (_, _, lambda_s1) = self.level(i - 1)?;
        let (_, _, lambda_s2) = self.level(i - 2)?;
        let (m0, m1, m2) = (self.output(1)?, self.output(2)?, self.output(3)?);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let d0 = m0;
        let d1_0 = m0.f_sub(m1)?.f_mul_scalar((1.0 / r0) as f64)?;
        let d1_1 = m1.f_sub(m2)?.f_mul_scalar((1.0 / r1) as f64)?;
        let diff = d1_0.f_sub(&d1_1)?;
        let d1 = d1_0.f_add(&diff.f_mul_scalar((r0 / (r0 + r1)) as f64)?)?;
        let d2 = diff.f_mul_scalar((1.0 / (r0 + r1)) as f64)?;
        match (self.algorithm, z) {
            (DpmAlgorithm::DpmSolverPlusPlus, _) => {
                let em = t_exp(-h)? - 1.0;
                Ok(sample
                    .f_mul_scalar((sigma_t / sigma_s0) as f64)?
                    .f_sub(&d0.f_mul_scalar((alpha_t * em) as f64)?)?
                    .f_add(&d1.f_mul_scalar((alpha_t * (em / h + 1.0)) as f64)?)?
                    .f_sub(&d2.f_mul_scalar((alpha_t * ((em + h) / (h * h) - 0.5)) as f64)?)?)
            }
            (DpmAlgorithm::SdeDpmSolverPlusPlus, Some(z)) => {
                let one_m_e2 = 1.0 - t_exp(-2.0 * h)?;
                let two_h = 2.0 * h;
                Ok(sample
                    .f_mul_scalar((sigma_t / sigma_s0 * t_exp(-h)?) as f64)?
                    .f_add(&d0.f_mul_scalar((alpha_t * one_m_e2) as f64)?)?
                    .f_add(&d1.f_mul_scalar((alpha_t * (one_m_e2 / (-2.0 * h) + 1.0)) as f64)?)?
                    .f_add(&d2.f_mul_scalar(
                        (alpha_t * ((one_m_e2 - two_h) / (two_h * two_h) - 0.5)) as f64,
                    )?)?
                    .f_add(&Self::noise_term(sigma_t, h, z)?)?)
            }
            _ => Err(Error::Internal("SDE step without noise".into())),
        }
    }

    /// The `back`-th most recent data prediction (1 = this step's).
    fn output(&self, back: usize) -> Result<&Tensor> {
        recent_output(&self.model_outputs, back, CLASS)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_inference_steps(num_inference_steps, self.schedule.num_train_timesteps)?;
        let (ts, sig) = self.schedule_for(num_inference_steps)?;
        let last = if self.final_sigma_min {
            self.table.sigma_min()?
        } else {
            0.0
        };
        self.sigmas = sig.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = (0..self.solver_order).map(|_| None).collect();
        self.lower_order_nums = 0;
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
        let i = multistep_step_index(
            CLASS,
            self.num_inference_steps.is_some(),
            model_output,
            sample,
            &mut self.counter,
            &self.timesteps,
            timestep,
        )?;
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || !self.final_sigma_min);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        let x0 = self.convert_model_output(model_output, sample, i)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.shallow_clone()));

        let sample = sample.f_to_kind(Kind::Float)?;
        let z = match self.algorithm {
            DpmAlgorithm::SdeDpmSolverPlusPlus => Some(draw_noise_like(noise, &sample)?),
            DpmAlgorithm::DpmSolverPlusPlus => None,
        };
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &x0, &sample, z.as_ref())?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &sample, z.as_ref())?
        } else {
            self.third_order(i, &sample, z.as_ref())?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.counter.advance();
        Ok(prev.f_to_kind(x0.kind())?)
    }

    fn noise_draws(&self) -> usize {
        match self.algorithm {
            DpmAlgorithm::SdeDpmSolverPlusPlus => self.timesteps.len(),
            DpmAlgorithm::DpmSolverPlusPlus => 0,
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        super::dpm_common::add_noise_at_sigma(
            original,
            noise,
            timestep,
            &self.timesteps,
            &self.sigmas,
            &self.counter,
        )
    }

    fn set_begin_index(&mut self, index: usize) {
        self.counter.begin_index = Some(index);
    }
}
