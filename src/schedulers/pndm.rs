//! Pseudo numerical methods for diffusion models (Liu et al., arXiv 2202.09778), equal to
//! diffusers' `PNDMScheduler`: a linear multistep method (PLMS) on DDIM's transfer function,
//! started either by Runge–Kutta steps (PRK) or, as Stable Diffusion configures it
//! (`skip_prk_steps`), by a second-order Heun-like first step.
use super::sigmas::extra_bool;
use super::{
    check_step_shapes, discrete_timesteps, torch_sqrt, BetaSchedule, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing, TrainSchedule,
};
use crate::rng::NoiseSource;
use crate::{Error, Result};
use tch::Tensor;

const CLASS: &str = "PNDMScheduler";

/// diffusers' `PNDMScheduler`.
///
/// Defaults as in diffusers: 1000 training steps, linear betas 1e-4 → 0.02, ε-prediction,
/// `skip_prk_steps` false, `set_alpha_to_one` false, `leading` spacing, `steps_offset` 0.
///
/// With `skip_prk_steps` the n timesteps t0 > t1 > … become n + 1 entries t0, t1, t1, t2, …:
/// the second evaluation at t1 corrects the first step (average of the two ε). Without it the
/// last four timesteps (the noisiest) are run as 12 Runge–Kutta evaluations and the rest with
/// PLMS (n − 3 + 12 entries); that needs at least 4 steps (diffusers fails below that).
///
/// The state (the last four ε, a step counter) lives in the scheduler and is not tied to the
/// timestep values: like diffusers, a run started mid-schedule (img2img) starts the
/// multistep history at its first step; `set_begin_index` is ignored.
///
/// One deviation: with `trailing` spacing and a step count for which numpy's `arange` rounding
/// yields an extra timestep of −1, diffusers indexes ᾱ[−1] (the last training step); that
/// element is dropped here, as in [`discrete_timesteps`].
pub struct PndmScheduler {
    schedule: TrainSchedule,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    skip_prk_steps: bool,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let prediction = config.prediction_type.unwrap_or(PredictionType::Epsilon);
        if prediction == PredictionType::Sample {
            return Err(Error::Unsupported(format!(
                "{CLASS} prediction_type sample; supported: epsilon, v_prediction"
            )));
        }
        let skip_prk_steps = extra_bool(config, "skip_prk_steps", false, CLASS)?;
        let schedule = TrainSchedule::from_config_without_zero_snr(
            config,
            (1000, 0.0001, 0.02, BetaSchedule::Linear),
            CLASS,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            schedule.alpha_cumprod(0)
        };
        let n = schedule.num_train_timesteps;
        Ok(Self {
            final_alpha_cumprod,
            prediction,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset.unwrap_or(0),
            skip_prk_steps,
            num_inference_steps: None,
            prk_timesteps: Vec::new(),
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
            schedule,
        })
    }

    /// The training schedule (betas, ᾱ).
    pub fn schedule(&self) -> &TrainSchedule {
        &self.schedule
    }

    pub fn skip_prk_steps(&self) -> bool {
        self.skip_prk_steps
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        Ok(self.schedule.alpha_cumprod(self.schedule.index(t as f64)?))
    }

    /// DDIM's deterministic update from `timestep` to `prev_timestep` with ε = `model_output`
    /// (eq. 9 of the PNDM paper), in diffusers' float32 arithmetic.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = self.alpha_at(timestep)?;
        let alpha_prod_t_prev = self.alpha_at(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.prediction {
            PredictionType::VPrediction => model_output
                .f_mul_scalar(torch_sqrt(alpha_prod_t)? as f64)?
                .f_add(&sample.f_mul_scalar(torch_sqrt(beta_prod_t)? as f64)?)?,
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = torch_sqrt(alpha_prod_t_prev / alpha_prod_t)?;
        let denom = alpha_prod_t * torch_sqrt(beta_prod_t_prev)?
            + torch_sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)?;
        let update = model_output
            .f_mul_scalar((alpha_prod_t_prev - alpha_prod_t) as f64)?
            .f_div_scalar(denom as f64)?;
        Ok(sample.f_mul_scalar(sample_coeff as f64)?.f_sub(&update)?)
    }

    fn steps(&self) -> Result<usize> {
        self.num_inference_steps
            .ok_or_else(|| Error::invalid("PNDM step called before set_timesteps".to_string()))
    }

    fn step_prk(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.steps()?;
        let n_train = self.schedule.num_train_timesteps;
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            (n_train / steps / 2) as i64
        };
        let prev_timestep = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let add = |acc: Option<Tensor>, term: Tensor| -> Result<Tensor> {
            Ok(match acc {
                None => term,
                Some(a) => a.f_add(&term)?,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                let term = model_output.f_mul_scalar(1.0 / 6.0)?;
                self.cur_model_output = Some(add(self.cur_model_output.take(), term)?);
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            1 | 2 => {
                let term = model_output.f_mul_scalar(1.0 / 3.0)?;
                self.cur_model_output = Some(add(self.cur_model_output.take(), term)?);
                model_output.shallow_clone()
            }
            _ => {
                let term = model_output.f_mul_scalar(1.0 / 6.0)?;
                add(self.cur_model_output.take(), term)?
            }
        };
        let cur_sample = self
            .cur_sample
            .as_ref()
            .map(|s| s.shallow_clone())
            .unwrap_or_else(|| sample.shallow_clone());
        let prev = self.prev_sample(&cur_sample, t, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.steps()?;
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(format!(
                "{CLASS}: PLMS steps need the 12 Runge-Kutta steps before them"
            )));
        }
        let ratio = (self.schedule.num_train_timesteps / steps) as i64;
        let mut timestep = timestep;
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.shallow_clone();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().ok_or_else(|| {
                Error::Internal("PNDM: no stored sample for the corrector step".to_string())
            })?;
            model_output.f_add(&e[0])?.f_div_scalar(2.0)?
        } else if k == 2 {
            e[1].f_mul_scalar(3.0)?.f_sub(&e[0])?.f_div_scalar(2.0)?
        } else if k == 3 {
            e[2].f_mul_scalar(23.0)?
                .f_sub(&e[1].f_mul_scalar(16.0)?)?
                .f_add(&e[0].f_mul_scalar(5.0)?)?
                .f_div_scalar(12.0)?
        } else if k >= 4 {
            e[k - 1]
                .f_mul_scalar(55.0)?
                .f_sub(&e[k - 2].f_mul_scalar(59.0)?)?
                .f_add(&e[k - 3].f_mul_scalar(37.0)?)?
                .f_sub(&e[k - 4].f_mul_scalar(9.0)?)?
                .f_mul_scalar(1.0 / 24.0)?
        } else {
            return Err(Error::Internal(format!(
                "PNDM: {k} stored model outputs at step {}",
                self.counter
            )));
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.schedule.num_train_timesteps;
        if !self.skip_prk_steps && num_inference_steps < 4 {
            return Err(Error::invalid(format!(
                "{CLASS} with skip_prk_steps false needs num_inference_steps >= 4 (its 4 Runge-Kutta steps), got {num_inference_steps}"
            )));
        }
        // Ascending, as diffusers' `_timesteps`.
        let mut asc = discrete_timesteps(
            self.spacing,
            n_train,
            num_inference_steps,
            self.steps_offset,
        )?;
        asc.reverse();
        let n = asc.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // t0, t1, t1, t2, ... (descending; only the second timestep is repeated).
            let mut plms: Vec<i64> = asc[..n - 1].to_vec();
            if n >= 2 {
                plms.push(asc[n - 2]);
            }
            plms.push(asc[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let half = (n_train / num_inference_steps / 2) as i64;
            // The last four timesteps with their midpoints: a, a+h, b, b+h, c, c+h, d, d+h.
            let pairs: Vec<i64> = asc[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            // Drop d+h, repeat each, drop the first and last: a, a+h, a+h, b, b, ..., d.
            let repeated: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = asc[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(plms.iter()).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.num_inference_steps = Some(num_inference_steps);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
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
        self.steps()?;
        check_step_shapes(model_output, sample)?;
        let t = self.schedule.index(timestep)? as i64;
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }

    fn noise_draws(&self) -> usize {
        0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, timestep)
    }
}
