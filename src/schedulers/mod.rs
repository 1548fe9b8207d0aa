//! Noise schedulers behind one trait, numerically equal to diffusers' implementations.
//!
//! [`SchedulerConfig`] reads diffusers' `scheduler_config.json`; every field is optional and
//! each scheduler fills the missing ones with the defaults of its diffusers class. The shared
//! maths lives here: the training noise schedule (betas in float32 exactly as diffusers computes
//! them, `alphas_cumprod` by a float32 cumulative product), zero-terminal-SNR rescaling, numpy's
//! `linspace`/`arange` rounding for timestep spacing, the conversion of a model output into
//! predicted x0 and ε, sample clipping / dynamic thresholding and the forward process
//! `add_noise`. Per-step scalar coefficients are computed in `f32`, in diffusers' order, so
//! that the latents agree with diffusers' to float32 rounding.
pub mod ddim;
pub mod ddpm;
mod dpm_common;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod sigmas;
pub mod unipc;

pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use heun::HeunDiscreteScheduler;
pub use lcm::LcmScheduler;
pub use lms::LmsDiscreteScheduler;
pub use pndm::PndmScheduler;
pub use unipc::UniPcMultistepScheduler;

use crate::rng::NoiseSource;
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

/// Defines a string-valued config enum whose deserialisation error lists the valid values.
macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in diffusers' spelling.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The value as spelt in `scheduler_config.json`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Parses diffusers' spelling (case-sensitive, like diffusers).
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown value {:?}, expected one of: {}",
                        s,
                        Self::NAMES.join(", ")
                    ))
                })
            }
        }
    };
}

config_enum! {
    /// What the denoising model predicts.
    PredictionType {
        /// The noise ε that was added.
        Epsilon = "epsilon",
        /// The velocity v = √ᾱ ε − √(1−ᾱ) x0 (Imagen Video, section 2.4).
        VPrediction = "v_prediction",
        /// The clean sample x0.
        Sample = "sample",
    }
}

config_enum! {
    /// How betas are laid out over the training timesteps.
    BetaSchedule {
        Linear = "linear",
        ScaledLinear = "scaled_linear",
        SquaredcosCapV2 = "squaredcos_cap_v2",
        /// DDPM only in diffusers.
        Sigmoid = "sigmoid",
        /// DDPM only in diffusers.
        Laplace = "laplace",
    }
}

config_enum! {
    /// How inference timesteps are picked from the training timesteps
    /// (table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    TimestepSpacing {
        Leading = "leading",
        Trailing = "trailing",
        Linspace = "linspace",
    }
}

config_enum! {
    /// DDPM's posterior variance.
    VarianceType {
        FixedSmall = "fixed_small",
        FixedSmallLog = "fixed_small_log",
        FixedLarge = "fixed_large",
        FixedLargeLog = "fixed_large_log",
        Learned = "learned",
        LearnedRange = "learned_range",
    }
}

/// diffusers' `scheduler_config.json`. Every field is optional; a scheduler substitutes its
/// diffusers class's default for a missing (or `null`) field. Fields that no scheduler here
/// reads are kept in `extra`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(rename = "_diffusers_version")]
    pub diffusers_version: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub variance_type: Option<VarianceType>,
    pub rescale_betas_zero_snr: Option<bool>,
    /// Every other field of the file, untouched (for schedulers that read more).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`. Unreadable files are [`Error::Io`], malformed JSON is
    /// [`Error::Json`], and a field with a wrong type or value is [`Error::BadModel`] naming the
    /// file, the field and (for string enums) the valid values.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::models::config::read_text(path)?;
        let value: serde_json::Value = serde_json::from_str(&dpm_common::quote_nonfinite(&text))
            .map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_value(value).map_err(|msg| Error::BadModel(format!("{}: {msg}", path.display())))
    }

    /// Parses the JSON text of a scheduler config. Malformed JSON or a field with a wrong type
    /// or value is [`Error::InvalidArgument`] naming the field.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(&dpm_common::quote_nonfinite(s))
            .map_err(|e| Error::invalid(format!("scheduler config is not valid JSON: {e}")))?;
        Self::from_value(value).map_err(Error::InvalidArgument)
    }

    /// Deserialises, and on failure finds the field at fault so that the message names it.
    fn from_value(value: serde_json::Value) -> std::result::Result<Self, String> {
        crate::models::config::from_json_value(value, "scheduler config")
    }

    /// The config with some fields replaced: each override is a field name and its value as
    /// JSON text (e.g. `("use_karras_sigmas", "true")`), typed field or not. A value of the
    /// wrong type is an [`Error::InvalidArgument`] naming the field.
    pub fn with_overrides(&self, overrides: &[(&str, &str)]) -> Result<Self> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let mut value = serde_json::to_value(self)
            .map_err(|e| Error::Internal(format!("scheduler config does not serialise: {e}")))?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| Error::Internal("scheduler config is not a JSON object".into()))?;
        for (key, json) in overrides {
            let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
                Error::invalid(format!("override of `{key}`: {json:?} is not JSON: {e}"))
            })?;
            map.insert((*key).to_string(), v);
        }
        Self::from_value(value).map_err(Error::InvalidArgument)
    }

    /// The config with `_class_name` replaced.
    pub fn with_class_name(mut self, name: &str) -> Self {
        self.class_name = Some(name.to_string());
        self
    }
}

// ------------------------------------------------------------------------------------------
// The trait and the factories
// ------------------------------------------------------------------------------------------

/// A diffusion sampler: picks the timesteps and turns model outputs into less noisy samples.
pub trait Scheduler: Send {
    /// Prepares the schedule for `num_inference_steps` (error if 0 or > num_train_timesteps,
    /// naming the argument).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps the UNet is called with, in order (f64 so that schedulers with fractional
    /// timesteps fit).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the sample before it goes into the model at `timestep`.
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One reverse step: returns the previous (less noisy) sample. Draws any noise it needs
    /// from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// How many `noise.randn(sample_shape)` calls a full run over `timesteps()` makes (so the
    /// pipeline can draw them all up front, in order).
    fn noise_draws(&self) -> usize;

    /// Closed-form forward process q(x_t | x_0): √ᾱ_t x0 + √(1−ᾱ_t) ε (timestep applies to the
    /// whole batch).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// Sets DDIM's η (the pipelines' `eta` argument). Like diffusers' pipelines, schedulers
    /// without an η ignore it; a negative or non-finite η is an error everywhere.
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        check_eta(eta)
    }

    /// Model evaluations per timestep entry (2 for Heun-style schedulers); img2img skips
    /// `t_start * order` entries of `timesteps()`.
    fn order(&self) -> usize {
        1
    }

    /// Tells index-based schedulers that the run starts at `timesteps()[index]` (img2img and
    /// inpainting skip the first steps). Schedulers that look timesteps up by value ignore it.
    fn set_begin_index(&mut self, _index: usize) {}
}

pub(crate) fn check_eta(eta: f64) -> Result<()> {
    if eta.is_finite() && eta >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "eta must be a finite number >= 0, got {eta}"
        )))
    }
}

/// (short name, diffusers class name) of every supported scheduler. To add one: an entry
/// here and an arm in [`build_scheduler`].
const SCHEDULERS: &[(&str, &str)] = &[
    ("ddim", "DDIMScheduler"),
    ("ddpm", "DDPMScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("euler_a", "EulerAncestralDiscreteScheduler"),
    ("heun", "HeunDiscreteScheduler"),
    ("lms", "LMSDiscreteScheduler"),
    ("pndm", "PNDMScheduler"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ("unipc", "UniPCMultistepScheduler"),
    ("lcm", "LCMScheduler"),
];

/// Sampler names of the AUTOMATIC1111 web UI: (name, diffusers class, config overrides as
/// (field, JSON value)) — the overrides are applied on top of the model's scheduler config.
/// An entry whose class is not (yet) in [`SCHEDULERS`] is reported as unavailable.
/// Config overrides of a scheduler name: (field, value as JSON text).
type ConfigOverrides = &'static [(&'static str, &'static str)];

const A1111_NAMES: &[(&str, &str, ConfigOverrides)] = &[
    ("Euler", "EulerDiscreteScheduler", &[]),
    ("Euler a", "EulerAncestralDiscreteScheduler", &[]),
    ("Heun", "HeunDiscreteScheduler", &[]),
    ("LMS", "LMSDiscreteScheduler", &[]),
    (
        "LMS Karras",
        "LMSDiscreteScheduler",
        &[("use_karras_sigmas", "true")],
    ),
    // CompVis' PLMS starts with the pseudo improved Euler step, not Runge-Kutta.
    ("PLMS", "PNDMScheduler", &[("skip_prk_steps", "true")]),
    ("DDIM", "DDIMScheduler", &[]),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", &[]),
    (
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        &[("use_karras_sigmas", "true")],
    ),
    (
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"sde-dpmsolver++\"")],
    ),
    (
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        &[
            ("algorithm_type", "\"sde-dpmsolver++\""),
            ("use_karras_sigmas", "true"),
        ],
    ),
    ("UniPC", "UniPCMultistepScheduler", &[]),
    ("LCM", "LCMScheduler", &[]),
    // Short names of DPM-Solver++ variants (they carry config overrides, so they live here).
    (
        "dpmpp_2m_karras",
        "DPMSolverMultistepScheduler",
        &[("use_karras_sigmas", "true")],
    ),
    (
        "dpmpp_2m_sde",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"sde-dpmsolver++\"")],
    ),
    (
        "dpmpp_2m_sde_karras",
        "DPMSolverMultistepScheduler",
        &[
            ("algorithm_type", "\"sde-dpmsolver++\""),
            ("use_karras_sigmas", "true"),
        ],
    ),
];

/// Builds the scheduler with the given short name from a config.
fn build_scheduler(short: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    match short {
        "ddim" => Ok(Box::new(DdimScheduler::new(config)?)),
        "ddpm" => Ok(Box::new(DdpmScheduler::new(config)?)),
        "euler" => Ok(Box::new(EulerDiscreteScheduler::new(config)?)),
        "euler_a" => Ok(Box::new(EulerAncestralDiscreteScheduler::new(config)?)),
        "heun" => Ok(Box::new(HeunDiscreteScheduler::new(config)?)),
        "lms" => Ok(Box::new(LmsDiscreteScheduler::new(config)?)),
        "pndm" => Ok(Box::new(PndmScheduler::new(config)?)),
        "dpmpp_2m" => Ok(Box::new(DpmSolverMultistepScheduler::new(config)?)),
        "unipc" => Ok(Box::new(UniPcMultistepScheduler::new(config)?)),
        "lcm" => Ok(Box::new(LcmScheduler::new(config)?)),
        _ => Err(Error::Internal(format!("scheduler {short} not wired up"))),
    }
}

/// The short names of the supported schedulers.
pub fn scheduler_names() -> &'static [&'static str] {
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| SCHEDULERS.iter().map(|(short, _)| *short).collect())
}

/// The diffusers class of the scheduler with this short name.
pub fn class_of(short: &str) -> Option<&'static str> {
    SCHEDULERS
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, class)| *class)
}

/// The A1111 sampler names that map to a supported scheduler.
pub fn a1111_scheduler_names() -> Vec<&'static str> {
    A1111_NAMES
        .iter()
        .filter(|(_, class, _)| SCHEDULERS.iter().any(|(_, c)| c == class))
        .map(|(name, _, _)| *name)
        .collect()
}

fn valid_names() -> String {
    let mut names: Vec<String> = SCHEDULERS
        .iter()
        .map(|(short, class)| format!("{short} ({class})"))
        .collect();
    names.extend(a1111_scheduler_names().iter().map(|n| format!("{n:?}")));
    names.join(", ")
}

/// What a scheduler name resolves to: a short name and the config overrides it carries.
fn resolve_name(name: &str) -> Result<(&'static str, ConfigOverrides)> {
    let key = name.trim();
    let by_class = |class: &str| {
        SCHEDULERS
            .iter()
            .find(|(_, c)| class.eq_ignore_ascii_case(c))
    };
    if let Some((short, _)) = SCHEDULERS
        .iter()
        .find(|(short, class)| key.eq_ignore_ascii_case(short) || key.eq_ignore_ascii_case(class))
    {
        return Ok((short, &[]));
    }
    if let Some((a1111, class, overrides)) = A1111_NAMES
        .iter()
        .find(|(n, _, _)| key.eq_ignore_ascii_case(n))
    {
        return match by_class(class) {
            Some((short, _)) => Ok((short, overrides)),
            None => Err(Error::Unsupported(format!(
                "scheduler {a1111:?} ({class}) is not available in this build; valid names: {}",
                valid_names()
            ))),
        };
    }
    Err(Error::invalid(format!(
        "unknown scheduler {name:?}; valid names: {}",
        valid_names()
    )))
}

/// Chooses a scheduler by name, case-insensitively: diffusers class names ("DDIMScheduler",
/// "EulerDiscreteScheduler", ...), short names ("ddim", "euler_a", ...) and the sampler names
/// of the AUTOMATIC1111 web UI ("Euler a", "LMS Karras", "PLMS", ...; those may also set
/// config fields, e.g. `use_karras_sigmas`). An unknown name is an InvalidArgument listing the
/// valid names. The config's `_class_name` is ignored: the config's values are used with the
/// chosen class's defaults, like diffusers' `from_config`.
pub fn scheduler_from_name(name: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let (short, overrides) = resolve_name(name)?;
    if overrides.is_empty() {
        build_scheduler(short, config)
    } else {
        build_scheduler(short, &config.with_overrides(overrides)?)
    }
}

/// The AUTOMATIC1111 sampler name of the scheduler that `name` (or, when `None`, the config's
/// own class) selects on `config`, for the PNG info A1111's readers parse: the most specific
/// A1111 name whose settings the selected config already has (`DPM++ 2M SDE Karras` rather
/// than `DPM++ 2M`), and whether it runs Karras sigmas without its name saying so (A1111 then
/// writes `Schedule type: Karras`). `None` where A1111 has no name for it (full PNDM, DDPM).
pub fn a1111_sampler_name(
    name: Option<&str>,
    config: &SchedulerConfig,
) -> Result<Option<(&'static str, bool)>> {
    let requested = name.or(config.class_name.as_deref()).unwrap_or("");
    let (short, overrides) = resolve_name(requested)?;
    let class = SCHEDULERS
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, c)| *c)
        .unwrap_or_default();
    let effective = config.with_overrides(overrides)?;
    let as_json = |c: &SchedulerConfig| {
        serde_json::to_value(c)
            .map_err(|e| Error::Internal(format!("scheduler config does not serialise: {e}")))
    };
    let settled = as_json(&effective)?;
    let mut best: Option<(&'static str, usize)> = None;
    // The display names (the lower-case ones are short-name aliases).
    for (a1111, c, o) in A1111_NAMES
        .iter()
        .filter(|(n, _, _)| n.contains(|c: char| c.is_ascii_uppercase()))
    {
        if *c != class || as_json(&effective.with_overrides(o)?)? != settled {
            continue;
        }
        if best.map_or(true, |(_, n)| o.len() > n) {
            best = Some((a1111, o.len()));
        }
    }
    let karras = settled
        .get("use_karras_sigmas")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    Ok(best.map(|(a1111, _)| (a1111, karras && !a1111.contains("Karras"))))
}

/// The scheduler named by the config's `_class_name`, when supported.
pub fn scheduler_from_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let class = config.class_name.as_deref().ok_or_else(|| {
        Error::invalid(format!(
            "scheduler config has no _class_name; choose a scheduler by name: {}",
            valid_names()
        ))
    })?;
    if !SCHEDULERS
        .iter()
        .any(|(_, c)| class.eq_ignore_ascii_case(c))
    {
        return Err(Error::Unsupported(format!(
            "scheduler class {class:?} from the config is not supported; supported: {}",
            valid_names()
        )));
    }
    scheduler_from_name(class, config)
}

// ------------------------------------------------------------------------------------------
// Shared maths
// ------------------------------------------------------------------------------------------

fn cpu_f32() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

/// diffusers' `betas_for_alpha_bar`: discretises ᾱ(t) in f64, capped at `max_beta`, then f32.
fn betas_for_alpha_bar(n: usize, laplace: bool) -> Result<Tensor> {
    let alpha_bar = |t: f64| -> f64 {
        if laplace {
            let lmb = -0.5 * 1f64.copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
            let snr = lmb.exp();
            (snr / (1.0 + snr)).sqrt()
        } else {
            let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
            c * c
        }
    };
    let max_beta = 0.999f64;
    let betas: Vec<f32> = (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect();
    Ok(Tensor::f_from_slice(&betas)?)
}

/// The float32 betas of a beta schedule, as diffusers computes them.
pub fn betas_for_schedule(
    schedule: BetaSchedule,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
) -> Result<Tensor> {
    if !beta_start.is_finite() || !beta_end.is_finite() {
        return Err(Error::invalid(format!(
            "beta_start and beta_end must be finite, got {beta_start} and {beta_end}"
        )));
    }
    let n = num_train_timesteps as i64;
    Ok(match schedule {
        BetaSchedule::Linear => Tensor::f_linspace(beta_start, beta_end, n, cpu_f32())?,
        BetaSchedule::ScaledLinear => {
            if beta_start < 0.0 || beta_end < 0.0 {
                return Err(Error::invalid(format!(
                    "beta_schedule scaled_linear needs beta_start and beta_end >= 0, got {beta_start} and {beta_end}"
                )));
            }
            Tensor::f_linspace(beta_start.powf(0.5), beta_end.powf(0.5), n, cpu_f32())?
                .f_pow_tensor_scalar(2.0)?
        }
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(num_train_timesteps, false)?,
        BetaSchedule::Laplace => betas_for_alpha_bar(num_train_timesteps, true)?,
        BetaSchedule::Sigmoid => Tensor::f_linspace(-6.0, 6.0, n, cpu_f32())?
            .f_sigmoid()?
            .f_mul_scalar(beta_end - beta_start)?
            .f_add_scalar(beta_start)?,
    })
}

/// Rescales betas to zero terminal SNR (algorithm 1 of arXiv 2305.08891), in float32.
pub fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let alphas = betas.f_rsub_scalar(1.0)?;
    let alphas_cumprod = alphas.f_cumprod(0, None::<Kind>)?;
    let sqrt_ab = alphas_cumprod.f_sqrt()?;
    let first = sqrt_ab.f_get(0)?;
    let last = sqrt_ab.f_get(-1)?;
    let shifted = sqrt_ab.f_sub(&last)?;
    let scale = first.f_div(&first.f_sub(&last)?)?;
    let rescaled = shifted.f_mul(&scale)?;
    let alphas_bar = rescaled.f_pow_tensor_scalar(2.0)?;
    let n = alphas_bar.size()[0];
    let ratios = alphas_bar
        .f_narrow(0, 1, n - 1)?
        .f_div(&alphas_bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[alphas_bar.f_narrow(0, 0, 1)?, ratios], 0)?;
    Ok(alphas.f_rsub_scalar(1.0)?)
}

/// The training noise schedule: betas and ᾱ_t = ∏(1 − β) in float32 on the CPU.
pub struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub betas: Tensor,
    /// ᾱ_t as a float32 tensor.
    pub alphas_cumprod: Tensor,
    /// The same values, for the per-step scalar maths.
    pub alphas_cumprod_f32: Vec<f32>,
}

/// The beta schedules most diffusers classes implement: linear, scaled linear and
/// `squaredcos_cap_v2`.
pub(crate) const COMMON_BETA_SCHEDULES: &[BetaSchedule] = &[
    BetaSchedule::Linear,
    BetaSchedule::ScaledLinear,
    BetaSchedule::SquaredcosCapV2,
];

impl TrainSchedule {
    /// [`TrainSchedule::from_config`] for a class that does not read `rescale_betas_zero_snr`
    /// (diffusers ignores it there), with the [`COMMON_BETA_SCHEDULES`].
    pub(crate) fn from_config_without_zero_snr(
        config: &SchedulerConfig,
        defaults: (usize, f64, f64, BetaSchedule),
        class: &str,
    ) -> Result<Self> {
        let mut plain = config.clone();
        plain.rescale_betas_zero_snr = None;
        Self::from_config(&plain, defaults, COMMON_BETA_SCHEDULES, class)
    }

    /// Builds the schedule from a config, with the given class defaults for the beta fields
    /// (`num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`). `supported` lists the
    /// beta schedules the diffusers class implements; `class` names it in errors.
    pub fn from_config(
        config: &SchedulerConfig,
        defaults: (usize, f64, f64, BetaSchedule),
        supported: &[BetaSchedule],
        class: &str,
    ) -> Result<Self> {
        let n = config.num_train_timesteps.unwrap_or(defaults.0);
        if n == 0 {
            return Err(Error::invalid(
                "num_train_timesteps must be at least 1, got 0",
            ));
        }
        if n > crate::limits::MAX_TRAIN_TIMESTEPS {
            return Err(Error::invalid(format!(
                "num_train_timesteps {n} is unreasonably large (at most {})",
                crate::limits::MAX_TRAIN_TIMESTEPS
            )));
        }
        let betas = match &config.trained_betas {
            Some(trained) => {
                if trained.len() != n {
                    return Err(Error::invalid(format!(
                        "trained_betas has {} values but num_train_timesteps is {n}",
                        trained.len()
                    )));
                }
                if let Some(b) = trained
                    .iter()
                    .find(|b| !(b.is_finite() && (0.0..=1.0).contains(*b)))
                {
                    return Err(Error::invalid(format!(
                        "trained_betas must lie in [0, 1], found {b}"
                    )));
                }
                let v: Vec<f32> = trained.iter().map(|&b| b as f32).collect();
                Tensor::f_from_slice(&v)?
            }
            None => {
                let schedule = config.beta_schedule.unwrap_or(defaults.3);
                if !supported.contains(&schedule) {
                    return Err(Error::Unsupported(format!(
                        "beta_schedule {schedule} is not implemented for {class}; it supports: {}",
                        supported
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                betas_for_schedule(
                    schedule,
                    n,
                    config.beta_start.unwrap_or(defaults.1),
                    config.beta_end.unwrap_or(defaults.2),
                )?
            }
        };
        let betas = if config.rescale_betas_zero_snr.unwrap_or(false) {
            rescale_zero_terminal_snr(&betas)?
        } else {
            betas
        };
        let alphas_cumprod = betas.f_rsub_scalar(1.0)?.f_cumprod(0, None::<Kind>)?;
        let alphas_cumprod_f32 = Vec::<f32>::try_from(&alphas_cumprod)?;
        Ok(Self {
            num_train_timesteps: n,
            betas,
            alphas_cumprod,
            alphas_cumprod_f32,
        })
    }

    /// ᾱ at an integer training timestep.
    pub fn alpha_cumprod(&self, t: usize) -> f32 {
        self.alphas_cumprod_f32[t]
    }

    /// The training-timestep index a (whole-numbered) timestep stands for.
    pub fn index(&self, timestep: f64) -> Result<usize> {
        train_index(timestep, self.num_train_timesteps)
    }

    /// q(x_t | x_0) at one training timestep, as diffusers' `add_noise` computes it (ᾱ cast to
    /// the sample's dtype first).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let t = self.index(timestep)?;
        if original.size() != noise.size() {
            return Err(Error::invalid(format!(
                "add_noise: original has shape {:?} but noise has shape {:?}",
                original.size(),
                noise.size()
            )));
        }
        let a = self
            .alphas_cumprod
            .f_get(t as i64)?
            .f_to_kind(original.kind())?;
        let sqrt_a = a.f_sqrt()?;
        let sqrt_one_minus_a = a.f_rsub_scalar(1.0)?.f_sqrt()?;
        Ok(original
            .f_mul(&sqrt_a)?
            .f_add(&noise.f_mul(&sqrt_one_minus_a)?)?)
    }
}

/// The training-timestep index of `timestep`: a whole number in [0, num_train_timesteps).
pub fn train_index(timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.is_finite()
        && timestep.fract() == 0.0
        && timestep >= 0.0
        && timestep < num_train_timesteps as f64
    {
        Ok(timestep as usize)
    } else {
        Err(Error::invalid(format!(
            "timestep {timestep} is not a whole number in [0, {num_train_timesteps})"
        )))
    }
}

/// Checks `num_inference_steps` against the training schedule.
pub fn check_inference_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid(
            "num_inference_steps must be at least 1, got 0",
        ));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps ({num_inference_steps}) cannot be larger than num_train_timesteps ({num_train_timesteps})"
        )));
    }
    Ok(())
}

/// `np.linspace(start, stop, num)` (endpoint included), value for value.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats, value for value (numpy fills element i as
/// `start + i * ((start + step) - start)`).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    if step == 0.0 || !step.is_finite() {
        return Vec::new();
    }
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        out.push(second);
        let delta = second - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// The integer timesteps of DDPM/DDIM-style `set_timesteps`, descending.
///
/// Equal to diffusers' except for one bug there: with `trailing` spacing and a step count for
/// which numpy's `arange` yields one element too many, diffusers appends a timestep of −1
/// (and then runs num_inference_steps + 1 steps); that element is dropped here. A timestep
/// beyond the training range (`leading` with a `steps_offset` and as many steps as training
/// timesteps) is an error.
pub fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    check_inference_steps(num_inference_steps, num_train_timesteps)?;
    let n_train = num_train_timesteps as i64;
    let n = num_inference_steps as i64;
    let mut ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, num_inference_steps)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / num_inference_steps as f64;
            np_arange(num_train_timesteps as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    while ts.len() > num_inference_steps && ts.last().is_some_and(|&t| t < 0) {
        ts.pop();
    }
    if let Some(&bad) = ts.iter().find(|&&t| t < 0 || t >= n_train) {
        return Err(Error::invalid(format!(
            "num_inference_steps {num_inference_steps} with timestep_spacing {spacing} and steps_offset {steps_offset} gives timestep {bad}, outside [0, {num_train_timesteps})"
        )));
    }
    Ok(ts)
}

/// √x in float32 through libtorch's CPU kernel, as diffusers computes `alpha ** 0.5` on its
/// 0-dim float32 tensors. libtorch's vectorised float32 sqrt is not always correctly rounded
/// (it can be one ulp away from `f32::sqrt`), so the coefficients must come from it to match.
pub fn torch_sqrt(x: f32) -> Result<f32> {
    Ok(Tensor::from(x).f_sqrt()?.f_double_value(&[])? as f32)
}

/// x0 from a model output, as diffusers' DDPM/DDIM `step` computes it.
pub fn predicted_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<Tensor> {
    let sqrt_a = torch_sqrt(alpha_prod_t)? as f64;
    let sqrt_b = torch_sqrt(1.0 - alpha_prod_t)? as f64;
    Ok(match prediction {
        PredictionType::Epsilon => sample
            .f_sub(&model_output.f_mul_scalar(sqrt_b)?)?
            .f_div_scalar(sqrt_a)?,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample
            .f_mul_scalar(sqrt_a)?
            .f_sub(&model_output.f_mul_scalar(sqrt_b)?)?,
    })
}

/// (x0, ε) from a model output, as diffusers' DDIM `step` computes them (before clipping).
pub fn predicted_original_and_epsilon(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<(Tensor, Tensor)> {
    let sqrt_a = torch_sqrt(alpha_prod_t)? as f64;
    let sqrt_b = torch_sqrt(1.0 - alpha_prod_t)? as f64;
    let x0 = predicted_original(prediction, model_output, sample, alpha_prod_t)?;
    let eps = match prediction {
        PredictionType::Epsilon => model_output.shallow_clone(),
        PredictionType::Sample => sample
            .f_sub(&x0.f_mul_scalar(sqrt_a)?)?
            .f_div_scalar(sqrt_b)?,
        PredictionType::VPrediction => model_output
            .f_mul_scalar(sqrt_a)?
            .f_add(&sample.f_mul_scalar(sqrt_b)?)?,
    };
    Ok((x0, eps))
}

/// What happens to the predicted x0 before it is used: nothing, clipping to ±range, or
/// dynamic thresholding (Imagen), which wins over clipping as in diffusers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleClipping {
    None,
    Clip { range: f64 },
    Threshold { ratio: f64, max_value: f64 },
}

impl SampleClipping {
    /// Reads `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value`, `clip_sample`
    /// and `clip_sample_range`, with `clip_default` as the class default of `clip_sample`.
    pub fn from_config(config: &SchedulerConfig, clip_default: bool) -> Result<Self> {
        if config.thresholding.unwrap_or(false) {
            let ratio = config.dynamic_thresholding_ratio.unwrap_or(0.995);
            let max_value = config.sample_max_value.unwrap_or(1.0);
            if !(ratio.is_finite() && (0.0..=1.0).contains(&ratio)) {
                return Err(Error::invalid(format!(
                    "dynamic_thresholding_ratio must lie in [0, 1], got {ratio}"
                )));
            }
            if !max_value.is_finite() {
                return Err(Error::invalid(format!(
                    "sample_max_value must be finite, got {max_value}"
                )));
            }
            return Ok(SampleClipping::Threshold { ratio, max_value });
        }
        if config.clip_sample.unwrap_or(clip_default) {
            let range = config.clip_sample_range.unwrap_or(1.0);
            if !range.is_finite() || range < 0.0 {
                return Err(Error::invalid(format!(
                    "clip_sample_range must be a finite number >= 0, got {range}"
                )));
            }
            return Ok(SampleClipping::Clip { range });
        }
        Ok(SampleClipping::None)
    }

    pub fn apply(&self, x0: Tensor) -> Result<Tensor> {
        match *self {
            SampleClipping::None => Ok(x0),
            SampleClipping::Clip { range } => Ok(x0.f_clamp(-range, range)?),
            SampleClipping::Threshold { ratio, max_value } => {
                threshold_sample(&x0, ratio, max_value)
            }
        }
    }
}

/// Dynamic thresholding (Imagen, arXiv 2205.11487): per sample, s = clamp(quantile(|x|,
/// ratio), 1, max_value), then x is clamped to [−s, s] and divided by s.
pub fn threshold_sample(sample: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let kind = sample.kind();
    let shape = sample.size();
    if shape.len() < 2 {
        return Err(Error::invalid(format!(
            "dynamic thresholding needs a [batch, channels, ...] sample, got shape {shape:?}"
        )));
    }
    let x = match kind {
        Kind::Float | Kind::Double => sample.shallow_clone(),
        _ => sample.f_to_kind(Kind::Float)?,
    };
    let flat = x.f_reshape([shape[0], -1])?;
    let s = flat
        .f_abs()?
        .f_quantile_scalar(ratio, Some(1), false, "linear")?
        .f_clamp(1.0, max_value)?
        .f_unsqueeze(1)?;
    let out = flat
        .f_clamp_tensor(Some(&s.f_neg()?), Some(&s))?
        .f_div(&s)?;
    Ok(out.f_reshape(shape.as_slice())?.f_to_kind(kind)?)
}

/// One tensor of standard normal noise shaped, placed and typed like `like`.
pub fn draw_noise_like(noise: &mut dyn NoiseSource, like: &Tensor) -> Result<Tensor> {
    let shape = like.size();
    let n = noise.randn(&shape)?;
    if n.size() != shape {
        return Err(Error::Internal(format!(
            "noise source returned shape {:?} for a request of {:?}",
            n.size(),
            shape
        )));
    }
    Ok(n.f_to_device(like.device())?.f_to_kind(like.kind())?)
}

/// Checks that a model output and a sample can be combined elementwise.
pub fn check_step_shapes(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.size() != sample.size() {
        return Err(Error::invalid(format!(
            "model output has shape {:?} but the sample has shape {:?}",
            model_output.size(),
            sample.size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 10.0, 3), vec![0.0, 5.0, 10.0]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // numpy's length rounding yields a 62nd element here.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
    }

    fn config(json: serde_json::Value) -> SchedulerConfig {
        SchedulerConfig::from_value(json).unwrap()
    }

    /// Every A1111 sampler name we take is written back as itself, whatever the model's own
    /// scheduler; a model's own settings choose the most specific name; schedulers A1111 has
    /// no name for get none.
    #[test]
    fn a1111_sampler_names_round_trip() {
        let sd15 = config(serde_json::json!({
            "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": true
        }));
        let display = a1111_scheduler_names()
            .into_iter()
            .filter(|n| n.contains(|c: char| c.is_ascii_uppercase()));
        for name in display {
            assert_eq!(
                a1111_sampler_name(Some(name), &sd15).unwrap(),
                Some((name, false)),
                "{name}"
            );
        }
        assert_eq!(
            a1111_sampler_name(None, &sd15).unwrap(),
            Some(("PLMS", false))
        );
        let own = |json| a1111_sampler_name(None, &config(json)).unwrap();
        use serde_json::json;
        assert_eq!(
            own(json!({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true})),
            Some(("DPM++ 2M Karras", false))
        );
        assert_eq!(
            own(json!({"_class_name": "DPMSolverMultistepScheduler",
                       "algorithm_type": "sde-dpmsolver++"})),
            Some(("DPM++ 2M SDE", false))
        );
        assert_eq!(
            own(json!({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true})),
            Some(("Euler", true))
        );
        assert_eq!(
            own(json!({"_class_name": "PNDMScheduler", "skip_prk_steps": false})),
            None
        );
        assert_eq!(own(json!({"_class_name": "DDPMScheduler"})), None);
        assert_eq!(
            a1111_sampler_name(Some("euler_a"), &sd15).unwrap(),
            Some(("Euler a", false))
        );
    }
}
