//! Noise levels in the k-diffusion parametrisation (Karras et al., arXiv 2206.00364), shared by
//! the sigma-based schedulers (Euler, Euler ancestral, Heun, LMS, and the DPM-Solver family).
//!
//! A training timestep t has the noise level σ_t = √((1 − ᾱ_t) / ᾱ_t); a sample x_t of the
//! variance-preserving process corresponds to x_t · √(1 + σ_t²) of the variance-exploding one.
//! The helpers reproduce diffusers' arithmetic: σ in float32 through libtorch, `np.interp` in
//! float64 over those float32 values, `_sigma_to_t` with its float32 denominator, Karras /
//! exponential / beta schedules in float64, and the step-index bookkeeping (`begin_index`,
//! `_init_step_index`, `index_for_timestep`) that diffusers' sigma schedulers share.
use super::{np_arange, np_linspace, torch_sqrt, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};
use serde_json::Value;
use tch::{Kind, Tensor};

/// σ_t = √((1 − ᾱ_t) / ᾱ_t) for every training timestep, ascending in t, computed in float32
/// by libtorch exactly as diffusers does.
pub fn train_sigmas(alphas_cumprod: &Tensor) -> Result<Vec<f32>> {
    let ac = alphas_cumprod.f_to_kind(Kind::Float)?;
    let s = ac.f_rsub_scalar(1.0)?.f_div(&ac)?.f_sqrt()?;
    Ok(Vec::<f32>::try_from(&s)?)
}

/// ln σ in float32 (numpy's float32 `log`; numpy's SIMD kernel may differ from this correctly
/// rounded value by an ulp or two, which moves the fractional timesteps recomputed from Karras
/// / exponential / beta σ by up to ~1e-4; the σ themselves are unaffected).
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// The float32 timesteps, descending, that diffusers' sigma schedulers (Euler, Heun, LMS, ...)
/// derive from `timestep_spacing`: `linspace` gives fractional values
/// (`np.linspace(0, T − 1, n, dtype=float32)`), `leading` multiples of T // n plus
/// `steps_offset`, `trailing` `round(arange(T, 0, −T/n)) − 1`.
///
/// As in [`super::discrete_timesteps`], the extra element of −1 that numpy's `arange` rounding
/// sometimes gives `trailing` spacing in diffusers (which then runs n + 1 steps) is dropped.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Result<Vec<f32>> {
    let mut ts = spaced_timesteps_raw(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    )?;
    drop_extra(&mut ts, num_inference_steps);
    Ok(ts)
}

/// Removes the trailing −1 entry beyond `n` (see [`spaced_timesteps`]).
fn drop_extra<T: Copy + Into<f64>>(ts: &mut Vec<T>, n: usize) {
    while ts.len() > n && ts.last().is_some_and(|&t| t.into() < 0.0) {
        ts.pop();
    }
}

/// [`spaced_timesteps`] exactly as numpy computes them, including the extra −1 of `trailing`
/// spacing for some step counts (n = 61, 103, 121, 122 with 1000 training steps).
pub fn spaced_timesteps_raw(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Result<Vec<f32>> {
    super::check_inference_steps(num_inference_steps, num_train_timesteps)?;
    let n = num_inference_steps;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train_timesteps - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train_timesteps / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n as f64;
            np_arange(num_train_timesteps as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as f32 - 1.0)
                .collect()
        }
    })
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation between integer abscissae in
/// float64, clamped to the end values outside [0, len − 1].
pub fn interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    // numpy: slope = (fp[j+1] − fp[j]) / (xp[j+1] − xp[j]), here with xp[j+1] − xp[j] = 1.
    (y1 - y0) * (x - j as f64) + y0
}

/// σ at each (possibly fractional) timestep, interpolated linearly in the training σ.
pub fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| interp(t as f64, train_sigmas))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose σ is `sigma`, interpolating
/// linearly in log σ between the two neighbouring training timesteps (clamped to the table).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of {ln σ_i ≤ ln σ}: the first index reaching the total.
    let total = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let mut low_idx = 0usize;
    if total > 0 {
        let mut count = 0usize;
        for (i, &l) in log_sigmas.iter().enumerate() {
            if log_sigma - l as f64 >= 0.0 {
                count += 1;
            }
            if count == total {
                low_idx = i;
                break;
            }
        }
    }
    let low_idx = low_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    // numpy: (float32 − float64) / (float32 − float32), the denominator in float32.
    let w = (low as f64 - log_sigma) / ((low - high) as f64);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The Karras et al. schedule (eq. 5, ρ = 7) from `sigma_max` down to `sigma_min`, in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Noise levels evenly spaced in log σ from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), num_inference_steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// "Beta sampling" noise levels (arXiv 2407.12173): σ_min + F⁻¹(1 − r) (σ_max − σ_min) for r
/// evenly spaced in [0, 1], F the Beta(α, β) distribution function (diffusers: α = β = 0.6).
pub fn beta_sigmas(
    sigma_min: f64,
    sigma_max: f64,
    num_inference_steps: usize,
    alpha: f64,
    beta: f64,
) -> Vec<f64> {
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|r| sigma_min + beta_ppf(1.0 - r, alpha, beta) * (sigma_max - sigma_min))
        .collect()
}

/// ln Γ(x) for x > 0: the Stirling series after shifting the argument above 10.
fn ln_gamma(x: f64) -> f64 {
    let mut shift = 0.0;
    let mut z = x;
    while z < 10.0 {
        shift += z.ln();
        z += 1.0;
    }
    let z2 = z * z;
    // Σ B_2k / (2k (2k − 1) z^(2k−1)), k = 1..7.
    let coeffs = [
        1.0 / 12.0,
        -1.0 / 360.0,
        1.0 / 1260.0,
        -1.0 / 1680.0,
        1.0 / 1188.0,
        -691.0 / 360360.0,
        1.0 / 156.0,
    ];
    let mut series = 0.0;
    let mut zp = z;
    for c in coeffs {
        series += c / zp;
        zp *= z2;
    }
    (z - 0.5) * z.ln() - z + 0.5 * (2.0 * std::f64::consts::PI).ln() + series - shift
}

/// The continued fraction of the regularised incomplete beta function (evaluated with the
/// modified Lentz method); converges quickly for x < (a + 1) / (a + b + 2).
fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0));
    let mut h = d;
    for m in 1..1000 {
        let m = m as f64;
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 / guard(1.0 + even * d);
        c = guard(1.0 + even / c);
        h *= d * c;
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 / guard(1.0 + odd * d);
        c = guard(1.0 + odd / c);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function I_x(a, b), the Beta(a, b) distribution function.
pub fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_beta = ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b);
    let front = |x: f64, a: f64, b: f64| (a * x.ln() + b * (1.0 - x).ln() - ln_beta).exp() / a;
    if x < (a + 1.0) / (a + b + 2.0) {
        front(x, a, b) * beta_continued_fraction(x, a, b)
    } else {
        1.0 - front(1.0 - x, b, a) * beta_continued_fraction(1.0 - x, b, a)
    }
}

/// The quantile function of Beta(a, b) (scipy's `beta.ppf`), by bisection to full precision.
pub fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Which schedule replaces the interpolated noise levels (`use_karras_sigmas`,
/// `use_exponential_sigmas`, `use_beta_sigmas`; at most one may be set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSchedule {
    /// The training σ interpolated at the spaced timesteps.
    Interpolated,
    Karras,
    Exponential,
    Beta,
}

impl SigmaSchedule {
    /// Reads the three flags; more than one set is an error, as in diffusers.
    pub fn from_config(config: &SchedulerConfig, class: &str) -> Result<Self> {
        let flags = [
            (
                extra_bool(config, "use_karras_sigmas", false, class)?,
                Self::Karras,
            ),
            (
                extra_bool(config, "use_exponential_sigmas", false, class)?,
                Self::Exponential,
            ),
            (
                extra_bool(config, "use_beta_sigmas", false, class)?,
                Self::Beta,
            ),
        ];
        let set: Vec<Self> = flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|&(_, s)| s)
            .collect();
        match set.as_slice() {
            [] => Ok(Self::Interpolated),
            [one] => Ok(*one),
            _ => Err(Error::invalid(format!(
                "{class}: only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be true"
            ))),
        }
    }

    /// Converts interpolated noise levels (descending) into this schedule of `n` entries;
    /// `sigma_min` / `sigma_max` default to the last / first interpolated level.
    pub fn convert(
        self,
        interpolated: &[f64],
        n: usize,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
    ) -> Vec<f64> {
        if interpolated.is_empty() {
            return Vec::new();
        }
        let lo = sigma_min.unwrap_or(interpolated[interpolated.len() - 1]);
        let hi = sigma_max.unwrap_or(interpolated[0]);
        match self {
            Self::Interpolated => interpolated.to_vec(),
            Self::Karras => karras_sigmas(lo, hi, n),
            Self::Exponential => exponential_sigmas(lo, hi, n),
            Self::Beta => beta_sigmas(lo, hi, n, 0.6, 0.6),
        }
    }
}

/// The spaced timesteps (descending) and their noise levels, before the final σ is appended,
/// as diffusers' sigma schedulers compute them in `set_timesteps`: σ interpolated at the
/// spaced timesteps, then (Karras / exponential / beta) replaced by the chosen schedule of
/// `num_inference_steps` levels and the timesteps recomputed from it with [`sigma_to_t`].
///
/// The default σ_min of the replacement schedules is the σ of the last numpy timestep, the
/// extra −1 of `trailing` spacing included (it clamps to σ at t = 0), as in diffusers; the
/// replaced schedule itself has exactly `num_inference_steps` levels.
#[allow(clippy::too_many_arguments)]
pub fn k_schedule(
    train_sigmas: &[f32],
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
    schedule: SigmaSchedule,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
) -> Result<(Vec<f32>, Vec<f64>)> {
    let mut timesteps = spaced_timesteps_raw(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    )?;
    let mut interpolated = interp_sigmas(&timesteps, train_sigmas);
    if schedule == SigmaSchedule::Interpolated {
        drop_extra(&mut timesteps, num_inference_steps);
        interpolated.truncate(timesteps.len());
        return Ok((timesteps, interpolated));
    }
    let sigmas = schedule.convert(&interpolated, num_inference_steps, sigma_min, sigma_max);
    let timesteps = retime(&sigmas, train_sigmas);
    Ok((timesteps, sigmas))
}

/// The (fractional, float32) timesteps of the given noise levels, by [`sigma_to_t`].
pub fn retime(sigmas: &[f64], train_sigmas: &[f32]) -> Vec<f32> {
    let logs = log_sigmas(train_sigmas);
    sigmas
        .iter()
        .map(|&s| sigma_to_t(s, &logs) as f32)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Config fields kept in `SchedulerConfig::extra`
// ------------------------------------------------------------------------------------------

fn extra_value<'a>(config: &'a SchedulerConfig, key: &str) -> Option<&'a Value> {
    config.extra.get(key).filter(|v| !v.is_null())
}

fn wrong_type(class: &str, key: &str, what: &str, v: &Value) -> Error {
    Error::invalid(format!(
        "{class}: scheduler config field `{key}` must be {what}, got {v}"
    ))
}

/// A boolean field of [`SchedulerConfig::extra`]; missing or `null` gives `default`.
pub fn extra_bool(config: &SchedulerConfig, key: &str, default: bool, class: &str) -> Result<bool> {
    match extra_value(config, key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong_type(class, key, "a boolean", v)),
    }
}

/// A numeric field of [`SchedulerConfig::extra`]; missing or `null` gives `None`.
pub fn extra_f64(config: &SchedulerConfig, key: &str, class: &str) -> Result<Option<f64>> {
    match extra_value(config, key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(wrong_type(class, key, "a number", v)),
    }
}

/// A string field of [`SchedulerConfig::extra`] that must be one of `allowed` (diffusers'
/// spelling); missing or `null` gives `default`.
pub fn extra_choice(
    config: &SchedulerConfig,
    key: &str,
    default: &'static str,
    allowed: &[&'static str],
    class: &str,
) -> Result<&'static str> {
    match extra_value(config, key) {
        None => Ok(default),
        Some(Value::String(s)) => allowed.iter().copied().find(|a| a == s).ok_or_else(|| {
            Error::invalid(format!(
                "{class}: scheduler config field `{key}` is {s:?}, expected one of: {}",
                allowed.join(", ")
            ))
        }),
        Some(v) => Err(wrong_type(class, key, "a string", v)),
    }
}

/// The index of `timestep` in `timesteps` as diffusers' `index_for_timestep` picks it: the
/// second match when the value occurs more than once (so that a run started mid-schedule by
/// value does not repeat a noise level), else the only one.
pub fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// The standard deviation of the initial noise: max σ for `linspace` / `trailing` spacing,
/// √(max σ² + 1) for `leading` (float32, as diffusers).
pub fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> Result<f64> {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Ok(match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => torch_sqrt(max * max + 1.0)? as f64,
    })
}

/// √(σ² + 1) in float32: the divisor of `scale_model_input`.
pub fn input_scale(sigma: f32) -> Result<f32> {
    torch_sqrt(sigma * sigma + 1.0)
}

/// The model input of a sigma scheduler: sample / √(σ² + 1).
pub fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(sample.f_div_scalar(input_scale(sigma)? as f64)?)
}

/// x0 predicted from a model output at noise level σ (k-diffusion parametrisation):
/// ε: x − σ·out; v: out·(−σ/√(σ²+1)) + x/(σ²+1); sample: out.
pub fn denoised(
    prediction: super::PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    use super::PredictionType;
    Ok(match prediction {
        PredictionType::Epsilon => sample.f_sub(&model_output.f_mul_scalar(sigma as f64)?)?,
        PredictionType::VPrediction => {
            let s2p1 = sigma * sigma + 1.0;
            let c_out = -sigma / torch_sqrt(s2p1)?;
            model_output
                .f_mul_scalar(c_out as f64)?
                .f_add(&sample.f_div_scalar(s2p1 as f64)?)?
        }
        PredictionType::Sample => model_output.shallow_clone(),
    })
}

/// The forward process of a sigma scheduler: original + noise · σ (σ cast to the sample's
/// dtype first, as diffusers does).
pub fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    if original.size() != noise.size() {
        return Err(Error::invalid(format!(
            "add_noise: original has shape {:?} but noise has shape {:?}",
            original.size(),
            noise.size()
        )));
    }
    let s = Tensor::from(sigma)
        .f_to_kind(original.kind())?
        .f_to_device(original.device())?;
    Ok(original.f_add(&noise.f_mul(&s)?)?)
}

/// The step counter of diffusers' sigma schedulers: `step_index` advances by one per `step`;
/// it starts at `begin_index` when the pipeline set one (img2img), else at the position of
/// the first timestep passed to `step` / `scale_model_input`.
#[derive(Debug, Clone, Default)]
pub struct StepIndex {
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl StepIndex {
    /// Forgets both indices (diffusers' `set_timesteps`).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    pub fn begin_index(&self) -> Option<usize> {
        self.begin_index
    }

    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// The index the next step uses (what `_init_step_index` would set), without changing
    /// anything.
    pub fn current(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let i = match (self.step_index, self.begin_index) {
            (Some(i), _) | (None, Some(i)) => i,
            (None, None) => return lookup(timesteps, timestep),
        };
        if i >= timesteps.len() {
            return Err(Error::invalid(format!(
                "step index {i} is past the end of the {} timesteps; call set_timesteps before a new run",
                timesteps.len()
            )));
        }
        Ok(i)
    }

    /// Initialises the counter if needed and returns the index of this step.
    pub fn init(&mut self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let i = self.current(timesteps, timestep)?;
        self.step_index = Some(i);
        Ok(i)
    }

    /// Moves to the next step.
    pub fn advance(&mut self) {
        self.step_index = Some(self.step_index.map_or(0, |i| i + 1));
    }

    /// The σ index `add_noise` uses: by value when no begin index is set, else the current
    /// step index (inpainting re-noises after a step), else the begin index (img2img noises
    /// the start latents before the first step).
    pub fn noise_index(&self, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.begin_index, self.step_index) {
            (None, _) => lookup(timesteps, timestep),
            (Some(_), Some(i)) => Ok(i),
            (Some(b), None) => Ok(b),
        }
    }
}

fn lookup(timesteps: &[f64], timestep: f64) -> Result<usize> {
    index_for_timestep(timesteps, timestep).ok_or_else(|| {
        Error::invalid(format!(
            "timestep {timestep} is not one of the {} timesteps set by set_timesteps",
            timesteps.len()
        ))
    })
}

/// The σ at `index`, or an error naming the schedule's length (a run past its end).
pub fn sigma_at(sigmas: &[f32], index: usize) -> Result<f32> {
    sigmas.get(index).copied().ok_or_else(|| {
        Error::invalid(format!(
            "step index {index} is past the end of the schedule ({} noise levels); call set_timesteps before a new run",
            sigmas.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles() {
        // Symmetric Beta(0.6, 0.6): F(1/2) = 1/2.
        assert!((beta_cdf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-14);
        // scipy.stats.beta.ppf / cdf values.
        let reference = [
            (1e-6, 1.8558824624053043e-10),
            (0.01, 0.0008612388215429059),
            (0.3, 0.23401700387523572),
            (0.77, 0.8461624142323502),
            (0.999999, 0.9999999998144118),
        ];
        for (p, x) in reference {
            let got = beta_ppf(p, 0.6, 0.6);
            assert!(
                (got - x).abs() <= 1e-13 * x.max(1e-3),
                "p {p}: {got} vs {x}"
            );
        }
        assert!((beta_ppf(0.3, 2.5, 0.7) - 0.7097758912148804).abs() < 1e-13);
        assert!((beta_cdf(0.42, 2.5, 0.7) - 0.07170775864938646).abs() < 1e-14);
        // Beta(1, 1) is uniform; Beta(2, 1) has F(x) = x².
        assert!((beta_cdf(0.3, 1.0, 1.0) - 0.3).abs() < 1e-14);
        assert!((beta_ppf(0.25, 2.0, 1.0) - 0.5).abs() < 1e-14);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-14);
    }

    #[test]
    fn interpolation_and_inverse() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(0.5, &fp), 1.5);
        assert_eq!(interp(1.25, &fp), 2.5);
        assert_eq!(interp(7.0, &fp), 4.0);
        let logs = log_sigmas(&fp);
        assert!((sigma_to_t(2.0, &logs) - 1.0).abs() < 1e-7);
        assert!((sigma_to_t(2f64.sqrt() * 2.0, &logs) - 1.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(100.0, &logs), 2.0);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
        assert_eq!(index_for_timestep(&[3.0, 2.0, 2.0, 1.0], 2.0), Some(2));
        assert_eq!(index_for_timestep(&[3.0, 2.0, 1.0], 2.0), Some(1));
        assert_eq!(index_for_timestep(&[3.0, 2.0, 1.0], 2.5), None);
    }
}
