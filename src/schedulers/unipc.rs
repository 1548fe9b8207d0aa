//! UniPC (Zhao et al., arXiv 2302.04867): a multistep predictor (UniP) with a corrector (UniC)
//! that reuses the model output of the next step, equal to diffusers'
//! `UniPCMultistepScheduler`.
use super::dpm_common::{
    alpha_sigma, check_timestep_range, lambda, multistep_step_index, multistep_timesteps,
    recent_output, t_expm1, timesteps_of_sigmas, vp_data_prediction, Extra, StepCounter, VpTable,
};
use super::sigmas::{self, SigmaSchedule};
use super::{
    check_inference_steps, BetaSchedule, PredictionType, SampleClipping, Scheduler,
    SchedulerConfig, TimestepSpacing, TrainSchedule, COMMON_BETA_SCHEDULES,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "UniPCMultistepScheduler";

/// The B(h) of the UniPC update (section 3.3 of the paper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniPcSolverType {
    /// B(h) = h.
    Bh1,
    /// B(h) = e^h − 1.
    Bh2,
}

/// diffusers' `UniPCMultistepScheduler` (without a `solver_p`).
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `solver_order` 2, `solver_type` bh2, `predict_x0` true, `lower_order_final` true,
/// `disable_corrector` empty, `final_sigmas_type` zero, `linspace` spacing, `steps_offset` 0.
///
/// Every step first corrects the sample the previous step predicted, using this step's model
/// output (unless the previous step index is in `disable_corrector`), then predicts the next
/// one. Step-index bookkeeping and `add_noise` are those of DPM-Solver (see
/// [`super::DpmSolverMultistepScheduler`]). Flow matching is not supported.
pub struct UniPcMultistepScheduler {
    schedule: TrainSchedule,
    table: VpTable,
    prediction: PredictionType,
    solver_type: UniPcSolverType,
    solver_order: usize,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    sigma_schedule: SigmaSchedule,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    spacing: TimestepSpacing,
    steps_offset: i64,
    thresholding: SampleClipping,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    counter: StepCounter,
}

impl UniPcMultistepScheduler {
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
        let solver_type = match extra.choice(
            "solver_type",
            "bh2",
            &["bh1", "bh2", "midpoint", "heun", "logrho"],
        )? {
            "bh1" => UniPcSolverType::Bh1,
            // diffusers maps DPM-Solver's names to bh2.
            _ => UniPcSolverType::Bh2,
        };
        extra.reject_flag("use_flow_sigmas")?;
        extra.reject_flag("use_dynamic_shifting")?;
        if config.extra.get("solver_p").is_some_and(|v| !v.is_null()) {
            return Err(Error::Unsupported(format!("{CLASS}: solver_p")));
        }
        let thresholding = if config.thresholding.unwrap_or(false) {
            SampleClipping::from_config(config, false)?
        } else {
            SampleClipping::None
        };
        let table = VpTable::new(&schedule, config.rescale_betas_zero_snr.unwrap_or(false))?;
        let n = schedule.num_train_timesteps;
        Ok(Self {
            prediction: config.prediction_type.unwrap_or(PredictionType::Epsilon),
            solver_type,
            solver_order,
            predict_x0: extra.bool("predict_x0", true)?,
            lower_order_final: extra.bool("lower_order_final", true)?,
            disable_corrector: extra.usize_list("disable_corrector")?,
            sigma_schedule: SigmaSchedule::from_config(config, CLASS)?,
            sigma_min: extra.f64("sigma_min")?,
            sigma_max: extra.f64("sigma_max")?,
            final_sigma_min: extra.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])?
                == "sigma_min",
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset.unwrap_or(0),
            thresholding,
            num_inference_steps: None,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            sigmas: table.sigmas.clone(),
            model_outputs: (0..solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            counter: StepCounter::default(),
            table,
            schedule,
        })
    }

    /// The noise levels of the current schedule: one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn solver_order(&self) -> usize {
        self.solver_order
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    /// x0 (`predict_x0`) or ε, as the solver works on.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigmas::sigma_at(&self.sigmas, i)?)?;
        if self.predict_x0 {
            let x0 = vp_data_prediction(self.prediction, model_output, sample, alpha_t, sigma_t)?;
            self.thresholding.apply(x0)
        } else {
            let (a, s) = (alpha_t as f64, sigma_t as f64);
            Ok(match self.prediction {
                PredictionType::Epsilon => model_output.shallow_clone(),
                PredictionType::Sample => sample
                    .f_sub(&model_output.f_mul_scalar(a)?)?
                    .f_div_scalar(s)?,
                PredictionType::VPrediction => model_output
                    .f_mul_scalar(a)?
                    .f_add(&sample.f_mul_scalar(s)?)?,
            })
        }
    }

    /// The `back`-th most recent converted output (1 = the newest stored).
    fn output(&self, back: usize) -> Result<&Tensor> {
        recent_output(&self.model_outputs, back, CLASS)
    }

    /// λ at `sigmas[index]`.
    fn lambda_at(&self, index: usize) -> Result<f32> {
        let (a, s) = alpha_sigma(sigmas::sigma_at(&self.sigmas, index)?)?;
        lambda(a, s)
    }

    /// The pieces UniP and UniC share for an update from `sigmas[s0]` to `sigmas[t]` of the
    /// given order, with the older outputs at `sigmas[older[k]]` (newest first): the
    /// differences D1_k = (m_k − m0) / r_k, the vector r = (r_1, …, 1), the coefficients
    /// h·φ₁, B(h) and the right-hand side b, all in float32 as diffusers computes them.
    fn coefficients(&self, t: usize, s0: usize, older: &[usize], m0: &Tensor) -> Result<Coeffs> {
        let (alpha_t, sigma_t) = alpha_sigma(sigmas::sigma_at(&self.sigmas, t)?)?;
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas::sigma_at(&self.sigmas, s0)?)?;
        let h = lambda(alpha_t, sigma_t)? - lambda(alpha_s0, sigma_s0)?;
        let lambda_s0 = lambda(alpha_s0, sigma_s0)?;
        let mut rks = Vec::with_capacity(older.len() + 1);
        let mut d1s = Vec::with_capacity(older.len());
        for (k, &si) in older.iter().enumerate() {
            let mi = self.output(k + 2)?;
            let rk = (self.lambda_at(si)? - lambda_s0) / h;
            rks.push(rk);
            d1s.push(mi.f_sub(m0)?.f_div_scalar(rk as f64)?);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = t_expm1(hh)?;
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: i64 = 1;
        let b_h = match self.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => t_expm1(hh)?,
        };
        let order = older.len() + 1;
        let rks_t = Tensor::f_from_slice(&rks)?;
        let mut rows = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as i64 {
            rows.push(rks_t.f_pow_tensor_scalar(i - 1)?);
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        Ok(Coeffs {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            r: Tensor::f_stack(&rows, 0)?,
            b: Tensor::f_from_slice(&b)?,
            d1s: if d1s.is_empty() {
                None
            } else {
                Some(Tensor::f_stack(&d1s, 1)?)
            },
        })
    }

    /// x_t_ = σ_t/σ_s0 x − α_t hφ₁ m0 (data prediction) or α_t/α_s0 x − σ_t hφ₁ m0 (noise),
    /// and the factor α_t B(h) (or σ_t B(h)) of the higher-order terms.
    fn base(&self, c: &Coeffs, x: &Tensor, m0: &Tensor) -> Result<(Tensor, f32)> {
        Ok(if self.predict_x0 {
            (
                x.f_mul_scalar((c.sigma_t / c.sigma_s0) as f64)?
                    .f_sub(&m0.f_mul_scalar((c.alpha_t * c.h_phi_1) as f64)?)?,
                c.alpha_t * c.b_h,
            )
        } else {
            (
                x.f_mul_scalar((c.alpha_t / c.alpha_s0) as f64)?
                    .f_sub(&m0.f_mul_scalar((c.sigma_t * c.h_phi_1) as f64)?)?,
                c.sigma_t * c.b_h,
            )
        })
    }

    /// The UniP predictor of the given order from `sigmas[i]` to `sigmas[i + 1]`.
    fn predictor(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = self.output(1)?;
        let older: Vec<usize> = (1..order).map(|k| i.wrapping_sub(k)).collect();
        let c = self.coefficients(i + 1, i, &older, m0)?;
        let (x_t_, factor) = self.base(&c, x, m0)?;
        let x_t = match &c.d1s {
            Some(d1s) => {
                let rhos_p = if order == 2 {
                    Tensor::f_from_slice(&[0.5f32])?
                } else {
                    let k = order as i64 - 1;
                    Tensor::f_linalg_solve(
                        &c.r.f_narrow(0, 0, k)?.f_narrow(1, 0, k)?,
                        &c.b.f_narrow(0, 0, k)?,
                        true,
                    )?
                };
                let rhos_p = rhos_p.f_to_kind(x.kind())?.f_to_device(x.device())?;
                let pred_res =
                    Tensor::f_einsum("k,bkc...->bc...", &[&rhos_p, d1s], None::<&[i64]>)?;
                x_t_.f_sub(&pred_res.f_mul_scalar(factor as f64)?)?
            }
            // diffusers subtracts α_t B(h) · 0.
            None => x_t_.f_sub_scalar((factor * 0.0) as f64)?,
        };
        Ok(x_t.f_to_kind(x.kind())?)
    }

    /// The UniC corrector: recomputes the sample the previous step predicted from
    /// `last_sample`, now using this step's converted output `model_t` too.
    fn corrector(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let m0 = self.output(1)?;
        let older: Vec<usize> = (1..order).map(|k| i.wrapping_sub(k + 1)).collect();
        let c = self.coefficients(i, i.wrapping_sub(1), &older, m0)?;
        let (x_t_, factor) = self.base(&c, last_sample, m0)?;
        let rhos_c = if order == 1 {
            Tensor::f_from_slice(&[0.5f32])?
        } else {
            Tensor::f_linalg_solve(&c.r, &c.b, true)?
        };
        let rhos_c = rhos_c
            .f_to_kind(last_sample.kind())?
            .f_to_device(last_sample.device())?;
        let d1_t = model_t.f_sub(m0)?;
        let last_rho = rhos_c.f_get(order as i64 - 1)?;
        let mut inner = d1_t.f_mul(&last_rho)?;
        if let Some(d1s) = &c.d1s {
            let corr_res = Tensor::f_einsum(
                "k,bkc...->bc...",
                &[&rhos_c.f_narrow(0, 0, order as i64 - 1)?, d1s],
                None::<&[i64]>,
            )?;
            inner = corr_res.f_add(&inner)?;
        }
        let x_t = x_t_.f_sub(&inner.f_mul_scalar(factor as f64)?)?;
        Ok(x_t.f_to_kind(last_sample.kind())?)
    }
}

/// See [`UniPcMultistepScheduler::coefficients`].
struct Coeffs {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    r: Tensor,
    b: Tensor,
    d1s: Option<Tensor>,
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps;
        check_inference_steps(num_inference_steps, n_train)?;
        let n = num_inference_steps;
        let train = &self.table.sigmas;
        let (sigma_min, sigma_max) = (
            self.sigma_min.unwrap_or(train[0] as f64),
            self.sigma_max.unwrap_or(train[n_train - 1] as f64),
        );
        let to_t =
            |sig: &[f64], round: bool| timesteps_of_sigmas(sig, &self.table.log_sigmas, round);
        let (ts, sig) = match self.sigma_schedule {
            SigmaSchedule::Interpolated => {
                let ts = multistep_timesteps(self.spacing, n_train, n_train, n, self.steps_offset);
                check_timestep_range(CLASS, &ts, n, n_train, self.spacing, self.steps_offset)?;
                let sig: Vec<f64> = ts.iter().map(|&t| train[t as usize] as f64).collect();
                (ts, sig)
            }
            SigmaSchedule::Karras => {
                let sig = sigmas::karras_sigmas(sigma_min, sigma_max, n);
                (to_t(&sig, true), sig)
            }
            SigmaSchedule::Exponential => {
                let sig = sigmas::exponential_sigmas(sigma_min, sigma_max, n);
                (to_t(&sig, false), sig)
            }
            SigmaSchedule::Beta => {
                let sig = sigmas::beta_sigmas(sigma_min, sigma_max, n, 0.6, 0.6);
                (to_t(&sig, false), sig)
            }
        };
        let last = match (self.final_sigma_min, self.sigma_schedule) {
            (false, _) => 0.0,
            (true, SigmaSchedule::Interpolated) => self.table.sigma_min()?,
            // The converted schedules end on their own last σ.
            (true, _) => sig.last().copied().unwrap_or(0.0) as f32,
        };
        self.sigmas = sig.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.num_inference_steps = Some(self.timesteps.len());
        self.model_outputs = (0..self.solver_order).map(|_| None).collect();
        self.lower_order_nums = 0;
        self.this_order = 0;
        self.last_sample = None;
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
        _noise: &mut dyn NoiseSource,
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
        let converted = self.convert_model_output(model_output, sample, i)?;
        let mut sample = sample.shallow_clone();
        if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = &self.last_sample {
                sample = self.corrector(i, &converted, last, self.this_order)?;
            }
        }
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = if self.lower_order_final {
            self.solver_order.min(n - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predictor(i, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.counter.advance();
        Ok(prev)
    }

    fn noise_draws(&self) -> usize {
        0
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
