//! Euler, Euler ancestral, Heun, LMS and PNDM against diffusers 0.42.1 (fixtures from
//! tools/fixtures/schedulers_k.py), plus the scheduler name table (short, class and A1111
//! names) and configuration errors.
mod common;

use common::{contains_all, err_text, f64s, rel_err, CountingNoise};
use serde_json::Value;
use stable_diffusion::rng::{GlobalNoise, GLOBAL_RNG};
use stable_diffusion::schedulers::{
    scheduler_from_config, scheduler_from_name, scheduler_names, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, HeunDiscreteScheduler, LmsDiscreteScheduler, PndmScheduler, Scheduler,
    SchedulerConfig,
};
use stable_diffusion::Error;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Latents after every step, model inputs and add_noise results: max |Δ| / max |ref|.
const TOLERANCE: f64 = 1e-5;
/// Noise levels, init_noise_sigma and timesteps, relative.
/// libtorch's float32 kernels round differently from one CPU to another (AVX2 against
/// AVX-512 paths of `exp`, `log`, reductions), and the references were made on one CPU: a
/// few float32 rounding steps of slack keep the tests meaning the same on every machine.
const SIGMA_TOLERANCE: f64 = 4e-6;
/// Fractional timesteps recomputed from Karras / exponential / beta sigmas (numpy's float32
/// `log` is not correctly rounded, which moves them slightly), absolute.
const RETIMED_TOLERANCE: f64 = 5e-4;

fn config_of(v: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&v.to_string()).expect("fixture config parses")
}

/// Whether the config replaces the interpolated sigmas (then timesteps are recomputed from
/// them and only agree to `RETIMED_TOLERANCE`).
fn retimed(config: &Value) -> bool {
    [
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
    ]
    .iter()
    .any(|k| config[k].as_bool() == Some(true))
}

/// The noise levels of a concrete scheduler after set_timesteps (PNDM has none).
fn sigmas_of(class: &str, config: &SchedulerConfig, n: usize) -> Option<Vec<f32>> {
    fn run<S: Scheduler>(mut s: S, n: usize, get: fn(&S) -> &[f32]) -> Vec<f32> {
        s.set_timesteps(n).unwrap();
        get(&s).to_vec()
    }
    Some(match class {
        "EulerDiscreteScheduler" => run(
            EulerDiscreteScheduler::new(config).unwrap(),
            n,
            EulerDiscreteScheduler::sigmas,
        ),
        "EulerAncestralDiscreteScheduler" => run(
            EulerAncestralDiscreteScheduler::new(config).unwrap(),
            n,
            EulerAncestralDiscreteScheduler::sigmas,
        ),
        "HeunDiscreteScheduler" => run(
            HeunDiscreteScheduler::new(config).unwrap(),
            n,
            HeunDiscreteScheduler::sigmas,
        ),
        "LMSDiscreteScheduler" => run(
            LmsDiscreteScheduler::new(config).unwrap(),
            n,
            LmsDiscreteScheduler::sigmas,
        ),
        _ => return None,
    })
}

#[derive(Default)]
struct Worst {
    step: (f64, String),
    input: f64,
    add_noise: f64,
    sigma: f64,
    retimed: f64,
}

impl Worst {
    fn note_step(&mut self, err: f64, name: &str) {
        if err > self.step.0 {
            self.step = (err, name.to_string());
        }
    }
}

fn max_rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// Checks timesteps (exact, or to `RETIMED_TOLERANCE` for recomputed ones), sigmas and
/// init_noise_sigma of a freshly set scheduler against a fixture record.
fn check_schedule(record: &Value, s: &dyn Scheduler, config: &SchedulerConfig, worst: &mut Worst) {
    let grid_name = format!("grid entry {}", record["config"]);
    let name = record["name"].as_str().unwrap_or(&grid_name);
    let class = record["class_name"].as_str().unwrap();
    let n = record["num_inference_steps"].as_u64().unwrap() as usize;
    let expected = f64s(&record["timesteps"]);
    let got = s.timesteps();
    assert_eq!(got.len(), expected.len(), "{name}: number of timesteps");
    let retimed = retimed(&record["config"]);
    for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
        if retimed {
            let d = (g - e).abs();
            worst.retimed = worst.retimed.max(d);
            assert!(
                d <= RETIMED_TOLERANCE,
                "{name}: timestep {i}: {g} vs diffusers' {e}"
            );
        } else {
            // Both are float32 values, equal up to the CPU's rounding (SIGMA_TOLERANCE).
            let d = (g as f32 as f64 - e as f32 as f64).abs();
            assert!(
                d <= SIGMA_TOLERANCE * e.abs().max(1e-3),
                "{name}: timestep {i}: {g} vs diffusers' {e}"
            );
        }
    }
    let init = record["init_noise_sigma"].as_f64().unwrap();
    let err = max_rel(s.init_noise_sigma(), init);
    worst.sigma = worst.sigma.max(err);
    assert!(
        err <= SIGMA_TOLERANCE,
        "{name}: init_noise_sigma {} vs {init}",
        s.init_noise_sigma()
    );
    if let Some(sigmas) = sigmas_of(class, config, n) {
        let expected = f64s(&record["sigmas"]);
        assert_eq!(sigmas.len(), expected.len(), "{name}: number of sigmas");
        for (i, (&g, &e)) in sigmas.iter().zip(&expected).enumerate() {
            let err = if e == 0.0 {
                g.abs() as f64
            } else {
                max_rel(g as f64, e)
            };
            worst.sigma = worst.sigma.max(err);
            assert!(err <= SIGMA_TOLERANCE, "{name}: sigma {i}: {g} vs {e}");
        }
    }
}

/// Runs one fixture case through the trait, as the pipeline does.
fn run_case(case: &Value, tensors: &HashMap<String, Tensor>, worst: &mut Worst) {
    let name = case["name"].as_str().unwrap();
    let class = case["class_name"].as_str().unwrap();
    let config = config_of(&case["config"]);
    let mut s = scheduler_from_name(class, &config).expect("scheduler builds");
    assert_eq!(
        s.order() as u64,
        case["order"].as_u64().unwrap(),
        "{name}: order"
    );
    let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();
    check_schedule(case, s.as_ref(), &config, worst);

    let t = |k: &str| &tensors[&format!("{name}/{k}")];
    let original = t("an_original");
    let an_noise = t("an_noise");
    let start = case["start"].as_u64().map(|v| v as usize);
    let ts = s.timesteps().to_vec();
    let mut x = match start {
        Some(start) => {
            s.set_begin_index(start);
            let x = s.add_noise(original, an_noise, ts[start]).unwrap();
            let err = rel_err(&x, t("start"));
            worst.add_noise = worst.add_noise.max(err);
            assert!(err <= TOLERANCE, "{name}: add_noise at the start: {err:e}");
            x
        }
        None => t("sample0").copy(),
    };
    let run = &ts[start.unwrap_or(0)..];
    let expected_draws = case["noise_draws"].as_u64().unwrap() as usize;
    assert_eq!(s.noise_draws(), expected_draws, "{name}: noise_draws()");

    let outputs = t("model_outputs");
    let inputs = t("model_inputs");
    let samples = t("samples");
    let mut noise = CountingNoise { draws: 0 };
    {
        let _guard = GLOBAL_RNG.lock();
        tch::manual_seed(case["seed"].as_i64().unwrap());
        for (i, &timestep) in run.iter().enumerate() {
            let i64i = i as i64;
            let input = s.scale_model_input(&x, timestep).unwrap();
            let err = rel_err(&input, &inputs.get(i64i));
            worst.input = worst.input.max(err);
            assert!(err <= TOLERANCE, "{name}: model input {i}: {err:e}");
            x = s
                .step(&outputs.get(i64i), timestep, &x, &mut noise)
                .unwrap();
            let err = rel_err(&x, &samples.get(i64i));
            worst.note_step(err, name);
            assert!(
                err <= TOLERANCE,
                "{name}: step {i} (t = {timestep}) relative error {err:e}"
            );
            if start.is_some() && i + 1 < run.len() {
                let renoised = s.add_noise(original, an_noise, run[i + 1]).unwrap();
                let err = rel_err(&renoised, &t("renoised").get(i64i));
                worst.add_noise = worst.add_noise.max(err);
                assert!(
                    err <= TOLERANCE,
                    "{name}: add_noise after step {i}: {err:e}"
                );
            }
        }
    }
    assert_eq!(noise.draws, expected_draws, "{name}: noise drawn");

    if start.is_none() {
        let mut fresh = scheduler_from_name(class, &config).unwrap();
        fresh.set_timesteps(steps).unwrap();
        let ts = fresh.timesteps().to_vec();
        let expected_ts = f64s(&case["add_noise_timesteps"]);
        let results = t("an_result");
        for (k, &e) in expected_ts.iter().enumerate() {
            // The same entry of our (possibly recomputed) timesteps.
            let timestep = *ts
                .iter()
                .min_by(|a, b| (*a - e).abs().total_cmp(&(*b - e).abs()))
                .unwrap();
            let got = fresh.add_noise(original, an_noise, timestep).unwrap();
            let err = rel_err(&got, &results.get(k as i64));
            worst.add_noise = worst.add_noise.max(err);
            assert!(err <= TOLERANCE, "{name}: add_noise at t = {e}: {err:e}");
        }
    }
}

#[test]
fn diffusers_cases() {
    let doc = common::scheduler_cases("schedulers_k");
    let tensors = common::scheduler_tensors("schedulers_k");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut worst = Worst::default();
    let mut per_class: HashMap<String, (usize, f64)> = HashMap::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut local = Worst::default();
        run_case(case, &tensors, &mut local);
        println!(
            "{name:38} steps {:3}  max rel err {:.3e}  input {:.3e}  add_noise {:.3e}",
            case["num_inference_steps"], local.step.0, local.input, local.add_noise
        );
        let entry = per_class
            .entry(case["class_name"].as_str().unwrap().to_string())
            .or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(local.step.0);
        worst.note_step(local.step.0, name);
        worst.input = worst.input.max(local.input);
        worst.add_noise = worst.add_noise.max(local.add_noise);
        worst.sigma = worst.sigma.max(local.sigma);
        worst.retimed = worst.retimed.max(local.retimed);
    }
    let mut classes: Vec<_> = per_class.into_iter().collect();
    classes.sort_by(|a, b| a.0.cmp(&b.0));
    for (class, (count, err)) in classes {
        println!("{class:34} {count:2} cases, worst step error {err:.3e}");
    }
    println!(
        "{} cases; worst step error {:.3e} ({}), model input {:.3e}, add_noise {:.3e}, sigma {:.3e}, recomputed timesteps {:.3e} (absolute)",
        cases.len(),
        worst.step.0,
        worst.step.1,
        worst.input,
        worst.add_noise,
        worst.sigma,
        worst.retimed
    );
}

#[test]
fn timestep_grid() {
    let doc = common::scheduler_cases("schedulers_k");
    let grid = doc["timestep_grid"].as_array().unwrap();
    let mut worst = Worst::default();
    let (mut checked, mut extra_dropped, mut skipped) = (0, 0, 0);
    for entry in grid {
        let class = entry["class_name"].as_str().unwrap();
        let config = config_of(&entry["config"]);
        let n = entry["num_inference_steps"].as_u64().unwrap() as usize;
        let mut s = scheduler_from_name(class, &config).unwrap();
        s.set_timesteps(n).unwrap();
        let mut record = entry.clone();
        let ts = f64s(&entry["timesteps"]);
        // diffusers' trailing spacing sometimes yields an extra timestep of −1 (numpy arange
        // rounding): dropped here, as for DDIM / DDPM.
        let sigma_classes = [
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "LMSDiscreteScheduler",
        ];
        if ts.len() == n + 1 && ts.last() == Some(&-1.0) && sigma_classes.contains(&class) {
            let mut sig = f64s(&entry["sigmas"]);
            // The σ of the extra timestep (log-linear levels do not depend on the timesteps).
            if entry["config"]["interpolation_type"] != "log_linear" {
                sig.remove(n);
            }
            record["timesteps"] = serde_json::json!(ts[..n]);
            record["sigmas"] = serde_json::json!(sig);
            extra_dropped += 1;
        } else if ts.contains(&-1.0) {
            skipped += 1;
            continue;
        }
        check_schedule(&record, s.as_ref(), &config, &mut worst);
        checked += 1;
    }
    println!(
        "timestep grid: {checked} schedules equal ({extra_dropped} with diffusers' trailing -1 dropped, {skipped} Heun/PNDM ones with it skipped); worst sigma error {:.3e}, recomputed timesteps {:.3e}",
        worst.sigma, worst.retimed
    );
    assert!(checked > 300);
    assert!(extra_dropped > 0);
}

fn sd_config() -> SchedulerConfig {
    // Stable Diffusion 1.5's scheduler_config.json.
    SchedulerConfig::from_json_str(
        r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
    )
    .unwrap()
}

#[test]
fn names() {
    let c = sd_config();
    for short in ["euler", "euler_a", "heun", "lms", "pndm", "ddim", "ddpm"] {
        assert!(scheduler_names().contains(&short), "{short} listed");
    }
    let class_of = [
        ("euler", "EulerDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"),
        ("lms", "LMSDiscreteScheduler"),
        ("pndm", "PNDMScheduler"),
    ];
    for (short, class) in class_of {
        for name in [
            short.to_string(),
            short.to_uppercase(),
            class.to_string(),
            class.to_lowercase(),
            format!("  {class} "),
        ] {
            let mut s = scheduler_from_name(&name, &c).unwrap();
            s.set_timesteps(10).unwrap();
        }
        // The class from the config's _class_name.
        scheduler_from_config(&c.clone().with_class_name(class)).unwrap();
    }

    // A1111 names, case-insensitive, with their config overrides.
    let steps = |name: &str, config: &SchedulerConfig| {
        let mut s = scheduler_from_name(name, config).unwrap();
        s.set_timesteps(10).unwrap();
        (s.timesteps().to_vec(), s.noise_draws(), s.order())
    };
    let with = |json: &str| SchedulerConfig::from_json_str(json).unwrap();
    let sd = r#""beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": true"#;
    let plain = with(&format!("{{{sd}}}"));
    let karras = with(&format!("{{{sd}, \"use_karras_sigmas\": true}}"));
    assert_eq!(steps("Euler", &c), steps("euler", &c));
    assert_eq!(steps("euler A", &c), steps("euler_a", &c));
    assert_eq!(steps("Euler a", &c).1, 10);
    assert_eq!(steps("HEUN", &c), steps("heun", &c));
    assert_eq!(steps("Heun", &c).2, 2);
    assert_eq!(steps("LMS", &plain), steps("lms", &plain));
    let lms_karras = steps("LMS Karras", &plain);
    assert_eq!(lms_karras, steps("lms", &karras));
    assert_ne!(lms_karras.0, steps("lms", &plain).0);
    assert!(lms_karras.0.iter().any(|t| t.fract() != 0.0));
    assert_eq!(steps("DDIM", &c), steps("ddim", &c));
    // PLMS is PNDM with skip_prk_steps, whatever the config says: n + 1 timesteps.
    let no_skip = with(r#"{"skip_prk_steps": false}"#);
    assert_eq!(steps("PLMS", &no_skip).0.len(), 11);
    assert_eq!(steps("pndm", &no_skip).0.len(), 19);
    assert_eq!(steps("plms", &c), steps("pndm", &c));
    // The DPM-Solver++ / UniPC / LCM names resolve to those classes.
    for name in [
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Karras",
        "dpm++ 2m karras",
        "UniPC",
        "LCM",
    ] {
        let r = scheduler_from_name(name, &c);
        assert!(
            r.is_ok(),
            "{name}: {}",
            r.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }

    // An unknown name lists the valid ones.
    let e = scheduler_from_name("Euler b", &c).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)));
    contains_all(
        &e.to_string(),
        &[
            "Euler b",
            "euler_a",
            "EulerAncestralDiscreteScheduler",
            "heun",
            "LMSDiscreteScheduler",
            "PNDMScheduler",
            "Euler a",
            "LMS Karras",
            "PLMS",
            "DPM++ 2M Karras",
        ],
    );
}

#[test]
fn config_errors() {
    let reject: &[(&str, &str, &[&str])] = &[
        (
            "euler",
            r#"{"use_karras_sigmas": true, "use_beta_sigmas": true}"#,
            &["use_karras_sigmas", "use_beta_sigmas"],
        ),
        (
            "lms",
            r#"{"use_karras_sigmas": "yes"}"#,
            &["use_karras_sigmas", "boolean"],
        ),
        (
            "euler",
            r#"{"final_sigmas_type": "one"}"#,
            &["final_sigmas_type", "one", "zero", "sigma_min"],
        ),
        (
            "euler",
            r#"{"interpolation_type": "cubic"}"#,
            &["interpolation_type", "cubic", "log_linear"],
        ),
        ("euler", r#"{"sigma_min": -1}"#, &["sigma_min"]),
        (
            "euler_a",
            r#"{"prediction_type": "sample"}"#,
            &["sample", "EulerAncestralDiscreteScheduler"],
        ),
        (
            "pndm",
            r#"{"prediction_type": "sample"}"#,
            &["sample", "PNDM"],
        ),
        ("pndm", r#"{"skip_prk_steps": 1}"#, &["skip_prk_steps"]),
        (
            "heun",
            r#"{"beta_schedule": "sigmoid"}"#,
            &["sigmoid", "HeunDiscreteScheduler", "scaled_linear"],
        ),
        (
            "heun",
            r#"{"clip_sample": true, "clip_sample_range": -2}"#,
            &["clip_sample_range"],
        ),
    ];
    for (name, json, parts) in reject {
        let config = SchedulerConfig::from_json_str(json).unwrap();
        contains_all(&err_text(scheduler_from_name(name, &config)), parts);
    }

    for name in ["euler", "euler_a", "heun", "lms", "pndm"] {
        let mut s = scheduler_from_name(name, &SchedulerConfig::default()).unwrap();
        contains_all(&err_text(s.set_timesteps(0)), &["num_inference_steps", "0"]);
        contains_all(
            &err_text(s.set_timesteps(1001)),
            &["num_inference_steps", "1001"],
        );
    }
    // PNDM's Runge-Kutta start needs 4 steps.
    let mut pndm = PndmScheduler::new(&SchedulerConfig::default()).unwrap();
    contains_all(
        &err_text(pndm.set_timesteps(3)),
        &["skip_prk_steps", "4", "3"],
    );
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    contains_all(
        &err_text(pndm.step(&x, 999.0, &x, &mut GlobalNoise)),
        &["set_timesteps"],
    );
}

#[test]
fn step_errors_and_state() {
    let c = sd_config();
    let x = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    for name in ["euler", "euler_a", "heun", "lms"] {
        let mut s = scheduler_from_name(name, &c).unwrap();
        s.set_timesteps(10).unwrap();
        // A timestep that is not in the schedule (looked up by value).
        contains_all(
            &err_text(s.step(&x, 123.5, &x, &mut GlobalNoise)),
            &["123.5", "set_timesteps"],
        );
        contains_all(&err_text(s.scale_model_input(&x, 123.5)), &["123.5"]);
        contains_all(&err_text(s.add_noise(&x, &x, 123.5)), &["123.5"]);
        let y = Tensor::ones([1, 4, 2, 3], (Kind::Float, Device::Cpu));
        let t0 = s.timesteps()[0];
        contains_all(&err_text(s.step(&y, t0, &x, &mut GlobalNoise)), &["shape"]);
        contains_all(&err_text(s.add_noise(&x, &y, t0)), &["shape"]);
        // A full run, then one step too many.
        let _guard = GLOBAL_RNG.lock();
        let mut latents = x.copy();
        for &t in s.timesteps().to_vec().iter() {
            let input = s.scale_model_input(&latents, t).unwrap();
            latents = s.step(&input, t, &latents, &mut GlobalNoise).unwrap();
        }
        assert!(bool::try_from(latents.isfinite().all()).unwrap(), "{name}");
        contains_all(
            &err_text(s.step(&x, t0, &x, &mut GlobalNoise)),
            &["past the end"],
        );
        // set_timesteps starts afresh.
        s.set_timesteps(10).unwrap();
        let _ = s.step(&x, t0, &x, &mut GlobalNoise).unwrap();
    }
    let mut pndm = scheduler_from_name("pndm", &c).unwrap();
    pndm.set_timesteps(10).unwrap();
    contains_all(
        &err_text(pndm.step(&x, 900.5, &x, &mut GlobalNoise)),
        &["900.5"],
    );
}

/// diffusers steps Euler-family schedulers in float32 and returns the model output's dtype.
#[test]
fn half_precision_euler() {
    let c = sd_config();
    for name in ["euler", "euler_a"] {
        let mut s = scheduler_from_name(name, &c).unwrap();
        s.set_timesteps(4).unwrap();
        let t = s.timesteps()[0];
        let x = Tensor::ones([1, 4, 2, 2], (Kind::Half, Device::Cpu));
        let _guard = GLOBAL_RNG.lock();
        let out = s.step(&x, t, &x, &mut GlobalNoise).unwrap();
        assert_eq!(out.kind(), Kind::Half, "{name}");
    }
}

/// The k-diffusion helpers on their own.
#[test]
fn sigma_helpers() {
    use stable_diffusion::schedulers::sigmas::{beta_ppf, karras_sigmas, sigma_to_t};
    let k = karras_sigmas(0.0292, 14.6146, 5);
    assert_eq!(k.len(), 5);
    assert!((k[0] - 14.6146).abs() < 1e-12 && (k[4] - 0.0292).abs() < 1e-12);
    assert!(k.windows(2).all(|w| w[0] > w[1]));
    assert!((beta_ppf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-14);
    let logs: Vec<f32> = [0.1f32, 1.0, 10.0].iter().map(|s| s.ln()).collect();
    assert!((sigma_to_t(1.0, &logs) - 1.0).abs() < 1e-6);
}
