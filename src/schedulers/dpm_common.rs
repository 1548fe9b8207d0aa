//! What the multistep solvers (DPM-Solver++, UniPC) and LCM share beyond [`super::sigmas`]:
//! float32 scalar maths through libtorch, the VP ↔ σ conversions, the step-index bookkeeping
//! with these classes' lookup rule, their `add_noise`, and typed access to the config fields
//! only they read.
//!
//! diffusers computes every per-step coefficient of these schedulers on 0-dim float32 tensors.
//! `+ − × ÷` are correctly rounded in both worlds, so they are done in Rust `f32`; the
//! transcendental functions go through libtorch's own kernels (the same library as PyTorch's),
//! so that the coefficients are bit-identical to diffusers'.
use super::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};
use serde_json::Value;
use tch::{Kind, Tensor};

/// A unary libtorch float32 function on one value (a 0-dim tensor, like diffusers' scalars).
fn unary(
    x: f32,
    f: impl FnOnce(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> Result<f32> {
    let t = f(&Tensor::from(x))?;
    Ok(t.f_double_value(&[])? as f32)
}

/// `torch.exp` of a float32 scalar.
pub(crate) fn t_exp(x: f32) -> Result<f32> {
    unary(x, |t| t.f_exp())
}

/// `torch.log` of a float32 scalar.
pub(crate) fn t_log(x: f32) -> Result<f32> {
    unary(x, |t| t.f_log())
}

/// `torch.expm1` of a float32 scalar.
pub(crate) fn t_expm1(x: f32) -> Result<f32> {
    unary(x, |t| t.f_expm1())
}

/// `torch.sqrt` (and `** 0.5`) of a float32 scalar.
pub(crate) fn t_sqrt(x: f32) -> Result<f32> {
    super::torch_sqrt(x)
}

/// (α_t, σ_t) of the VP process at noise level σ: α = 1 / √(σ² + 1), σ_t = σ α
/// (diffusers' `_sigma_to_alpha_sigma_t`).
pub(crate) fn alpha_sigma(sigma: f32) -> Result<(f32, f32)> {
    let alpha = 1.0 / t_sqrt(sigma * sigma + 1.0)?;
    Ok((alpha, sigma * alpha))
}

/// λ = log α − log σ (the half log-SNR); +∞ at σ = 0.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> Result<f32> {
    Ok(t_log(alpha)? - t_log(sigma)?)
}

/// `np.linspace(start, stop, num).round()[::-1][:-1]` and the other integer spacings of the
/// multistep schedulers, which space `num_inference_steps + 1` points and drop the last.
pub(crate) fn multistep_timesteps(
    spacing: super::TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    use super::TimestepSpacing;
    let n = num_inference_steps;
    let mut ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = super::np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .map(|x| x.round_ties_even() as i64)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (n + 1)) as i64;
            (1..=n as i64)
                .rev()
                .map(|i| i * ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n as f64;
            super::np_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    // numpy's arange rounding can give `trailing` one element too many, a timestep of −1
    // (diffusers then runs n + 1 steps); it is dropped, as everywhere in this crate.
    while ts.len() > n && ts.last().is_some_and(|&t| t < 0) {
        ts.pop();
    }
    ts
}

/// The index of `timestep` in `timesteps` as DPM-Solver's and UniPC's `index_for_timestep`
/// picks it: the second match of a repeated value, the only match, or — for a timestep that
/// is not in the schedule — the last index.
pub(crate) fn index_or_last(timesteps: &[f64], timestep: f64) -> usize {
    super::sigmas::index_for_timestep(timesteps, timestep)
        .unwrap_or_else(|| timesteps.len().saturating_sub(1))
}

/// diffusers' `_step_index` / `_begin_index` pair.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepCounter {
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
}

impl StepCounter {
    /// The index of the step about to run, initialising it as `_init_step_index` does: the
    /// begin index if one was set, else the timestep's position found by `lookup`.
    pub fn init(&mut self, lookup: impl FnOnce() -> Result<usize>) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => lookup()?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    pub fn advance(&mut self) {
        self.step_index = Some(self.step_index.map_or(0, |i| i + 1));
    }
}

/// The step index of a DPM-Solver / UniPC `step` call, after its checks: `set_timesteps`
/// has run (`ready`), the shapes match, and the index lies inside the schedule.
pub(crate) fn multistep_step_index(
    class: &str,
    ready: bool,
    model_output: &Tensor,
    sample: &Tensor,
    counter: &mut StepCounter,
    timesteps: &[f64],
    timestep: f64,
) -> Result<usize> {
    if !ready {
        return Err(Error::invalid(format!(
            "{class}: step called before set_timesteps"
        )));
    }
    super::check_step_shapes(model_output, sample)?;
    let i = counter.init(|| Ok(index_or_last(timesteps, timestep)))?;
    let n = timesteps.len();
    if i >= n {
        return Err(Error::invalid(format!(
            "{class}: step {} of a {n}-step schedule; call set_timesteps before a new run",
            i + 1
        )));
    }
    Ok(i)
}

/// The `back`-th most recent of the stored model outputs (1 = the newest).
pub(crate) fn recent_output<'a>(
    outputs: &'a [Option<Tensor>],
    back: usize,
    class: &str,
) -> Result<&'a Tensor> {
    outputs
        .get(outputs.len().wrapping_sub(back))
        .and_then(|o| o.as_ref())
        .ok_or_else(|| Error::Internal(format!("{class}: missing model output {back}")))
}

/// The data prediction x0 of a VP model's output at (α_t, σ_t).
pub(crate) fn vp_data_prediction(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    sigma_t: f32,
) -> Result<Tensor> {
    let (a, s) = (alpha_t as f64, sigma_t as f64);
    Ok(match prediction {
        PredictionType::Epsilon => sample
            .f_sub(&model_output.f_mul_scalar(s)?)?
            .f_div_scalar(a)?,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample
            .f_mul_scalar(a)?
            .f_sub(&model_output.f_mul_scalar(s)?)?,
    })
}

/// The training timesteps of noise levels (log-σ interpolation), rounded half to even when
/// `round`, else truncated.
pub(crate) fn timesteps_of_sigmas(sigmas: &[f64], log_sigmas: &[f32], round: bool) -> Vec<i64> {
    sigmas
        .iter()
        .map(|&s| {
            let t = super::sigmas::sigma_to_t(s, log_sigmas);
            (if round { t.round_ties_even() } else { t }) as i64
        })
        .collect()
}

/// Rejects spaced timesteps outside `[0, n_train)`, naming the settings that gave them.
pub(crate) fn check_timestep_range(
    class: &str,
    timesteps: &[i64],
    n: usize,
    n_train: usize,
    spacing: TimestepSpacing,
    steps_offset: i64,
) -> Result<()> {
    if let Some(&bad) = timesteps.iter().find(|&&t| t < 0 || t >= n_train as i64) {
        return Err(Error::invalid(format!(
            "{class}: {n} steps with timestep_spacing {spacing} and steps_offset {steps_offset} give timestep {bad}, outside [0, {n_train})"
        )));
    }
    Ok(())
}

/// DPM-Solver's and UniPC's `add_noise`: α_t x0 + σ_t ε at the noise level of the timestep
/// (looked up by value when no begin index is set, else the current step index — inpainting
/// re-noises after a step — else the begin index — img2img noises the start latents), with
/// α_t, σ_t computed in the sample's dtype.
pub(crate) fn add_noise_at_sigma(
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
    timesteps: &[f64],
    sigmas: &[f32],
    counter: &StepCounter,
) -> Result<Tensor> {
    if original.size() != noise.size() {
        return Err(Error::invalid(format!(
            "add_noise: original has shape {:?} but noise has shape {:?}",
            original.size(),
            noise.size()
        )));
    }
    if timesteps.is_empty() {
        return Err(Error::invalid(
            "add_noise called before set_timesteps".to_string(),
        ));
    }
    let index = match (counter.begin_index, counter.step_index) {
        (None, _) => index_or_last(timesteps, timestep),
        (Some(_), Some(i)) => i,
        (Some(b), None) => b,
    };
    let sigma = super::sigmas::sigma_at(sigmas, index)?;
    let kind = match original.kind() {
        k @ (Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) => k,
        _ => Kind::Float,
    };
    let s = Tensor::from(sigma).f_to_kind(kind)?;
    let alpha_t = s
        .f_pow_tensor_scalar(2)?
        .f_add_scalar(1)?
        .f_pow_tensor_scalar(0.5)?
        .f_reciprocal()?;
    let sigma_t = s.f_mul(&alpha_t)?;
    let device = original.device();
    Ok(original
        .f_mul(&alpha_t.f_to_device(device)?)?
        .f_add(&noise.f_mul(&sigma_t.f_to_device(device)?)?)?)
}

/// The training noise levels of DPM-Solver and UniPC: ᾱ (with diffusers' 2⁻²⁴ for a zero
/// terminal SNR, so that the first σ is finite), σ_t = √((1 − ᾱ)/ᾱ) in float32 and ln σ.
pub(crate) struct VpTable {
    pub alphas_cumprod: Tensor,
    pub sigmas: Vec<f32>,
    pub log_sigmas: Vec<f32>,
}

impl VpTable {
    pub fn new(schedule: &super::TrainSchedule, zero_terminal_snr: bool) -> Result<Self> {
        // A copy: the training schedule's own ᾱ stays untouched.
        let alphas_cumprod = schedule.alphas_cumprod.f_to_kind(Kind::Float)?.copy();
        if zero_terminal_snr {
            let n = schedule.num_train_timesteps as i64;
            let _ = alphas_cumprod.f_get(n - 1)?.f_fill_(2f64.powi(-24))?;
        }
        let sigmas = super::sigmas::train_sigmas(&alphas_cumprod)?;
        let log_sigmas = super::sigmas::log_sigmas(&sigmas);
        Ok(Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        })
    }

    /// √((1 − ᾱ_0)/ᾱ_0) as diffusers computes `final_sigmas_type="sigma_min"` (0-dim float32).
    pub fn sigma_min(&self) -> Result<f32> {
        let a0 = Vec::<f32>::try_from(&self.alphas_cumprod.f_get(0)?.f_reshape([1])?)?[0];
        t_sqrt((1.0 - a0) / a0)
    }
}

/// Python's `json` writes ±∞ and NaN as the bare tokens `Infinity`, `-Infinity` and `NaN`
/// (every `DPMSolverMultistepScheduler` config diffusers saves has
/// `"lambda_min_clipped": -Infinity`), which strict JSON rejects. This quotes those tokens
/// outside string literals, so that such a file parses; [`Extra::f64`] reads the strings back
/// as numbers.
pub(crate) fn quote_nonfinite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let boundary = !out
                .chars()
                .next_back()
                .is_some_and(|p| p.is_ascii_alphanumeric() || p == '_');
            if let Some(token) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| boundary && rest.starts_with(t))
            {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// Typed access to the config fields that only these schedulers read (kept in
/// [`SchedulerConfig::extra`]); a missing or `null` field takes the class default, a field of
/// the wrong type is an error naming it.
pub(crate) struct Extra<'a> {
    pub config: &'a SchedulerConfig,
    pub class: &'static str,
}

impl Extra<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.config.extra.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, what: &str, v: &Value) -> Error {
        Error::invalid(format!(
            "{}: config field `{key}` must be {what}, got {v}",
            self.class
        ))
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.wrong(key, "a whole number >= 0", v)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            // Python's json writes ±Infinity; a config that spells them as strings is read too.
            Some(Value::String(s)) if s.eq_ignore_ascii_case("-inf") || s == "-Infinity" => {
                Ok(Some(f64::NEG_INFINITY))
            }
            Some(Value::String(s)) if s.eq_ignore_ascii_case("inf") || s == "Infinity" => {
                Ok(Some(f64::INFINITY))
            }
            Some(Value::String(s)) if s == "NaN" => Ok(Some(f64::NAN)),
            Some(v) => Err(self.wrong(key, "a number", v)),
        }
    }

    /// A string field that must be one of `allowed`.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => allowed.iter().copied().find(|a| a == s).ok_or_else(|| {
                Error::invalid(format!(
                    "{}: config field `{key}` is {s:?}, expected one of: {}",
                    self.class,
                    allowed.join(", ")
                ))
            }),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| self.wrong(key, "a list of whole numbers", v))
                })
                .collect(),
            Some(v) => Err(self.wrong(key, "a list of whole numbers", v)),
        }
    }

    /// Fails for a set flag this crate does not implement.
    pub fn reject_flag(&self, key: &str) -> Result<()> {
        if self.bool(key, false)? {
            return Err(Error::Unsupported(format!(
                "{}: `{key}` is not supported",
                self.class
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::TimestepSpacing;

    #[test]
    fn multistep_spacings() {
        assert_eq!(
            multistep_timesteps(TimestepSpacing::Linspace, 1000, 1000, 4, 0),
            vec![999, 749, 500, 250]
        );
        assert_eq!(
            multistep_timesteps(TimestepSpacing::Leading, 1000, 1000, 4, 1),
            vec![801, 601, 401, 201]
        );
        assert_eq!(
            multistep_timesteps(TimestepSpacing::Trailing, 1000, 1000, 4, 0),
            vec![999, 749, 499, 249]
        );
        assert_eq!(
            multistep_timesteps(TimestepSpacing::Trailing, 1000, 1000, 61, 0).len(),
            61
        );
        assert_eq!(index_or_last(&[3.0, 2.0, 1.0], 7.0), 2);
        assert_eq!(index_or_last(&[3.0, 2.0, 2.0, 1.0], 2.0), 2);
    }

    #[test]
    fn python_json_tokens() {
        assert_eq!(quote_nonfinite(r#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(
            quote_nonfinite(r#"{"l": -Infinity, "m": [Infinity, NaN], "s": "NaN -Infinity"}"#),
            r#"{"l": "-Infinity", "m": ["Infinity", "NaN"], "s": "NaN -Infinity"}"#
        );
        assert_eq!(
            quote_nonfinite(r#"{"q\"NaN": NaN}"#),
            r#"{"q\"NaN": "NaN"}"#
        );
    }

    #[test]
    fn scalar_maths() {
        let (a, s) = alpha_sigma(0.0).unwrap();
        assert_eq!((a, s), (1.0, 0.0));
        assert_eq!(lambda(a, s).unwrap(), f32::INFINITY);
        assert_eq!(t_exp(0.0).unwrap(), 1.0);
        assert_eq!(t_expm1(f32::NEG_INFINITY).unwrap(), -1.0);
    }
}
