//! DDPM and DDIM against diffusers 0.42.1 (fixtures from tools/fixtures/schedulers.py), plus
//! config parsing and error reporting.
mod common;

use common::{config_of, contains_all, err_text, rel_err, CountingNoise};
use serde_json::Value;
use stable_diffusion::rng::{GlobalNoise, GLOBAL_RNG};
use stable_diffusion::schedulers::{
    scheduler_from_config, scheduler_from_name, scheduler_names, DdimScheduler, DdpmScheduler,
    Scheduler, SchedulerConfig,
};
use stable_diffusion::Error;
use std::collections::HashMap;
use tch::Tensor;

const TOLERANCE: f64 = 1e-5;

fn build(case: &Value, config: &SchedulerConfig) -> Box<dyn Scheduler> {
    let class = case["class_name"].as_str().unwrap();
    let mut s = scheduler_from_name(class, config).expect("scheduler builds");
    if let Some(eta) = case["eta"].as_f64() {
        s.set_eta(eta).unwrap();
    }
    s
}

/// Runs one fixture case; returns (worst step error, worst add_noise error).
fn run_case(
    case: &Value,
    config: &SchedulerConfig,
    tensors: &HashMap<String, Tensor>,
    check_timesteps: bool,
) -> (f64, f64) {
    let name = case["name"].as_str().unwrap();
    let mut s = build(case, config);
    let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();
    let expected_ts: Vec<i64> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let got_ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
    assert!(
        s.timesteps().iter().all(|t| t.fract() == 0.0),
        "{name}: fractional timesteps"
    );
    if check_timesteps {
        assert_eq!(got_ts, expected_ts, "{name}: timesteps");
    }
    let expected_draws = case["noise_draws"].as_u64().unwrap() as usize;
    assert_eq!(s.noise_draws(), expected_draws, "{name}: noise_draws()");

    let sample0 = &tensors[&format!("{name}/sample0")];
    let outputs = &tensors[&format!("{name}/model_outputs")];
    let samples = &tensors[&format!("{name}/samples")];
    let seed = case["seed"].as_i64().unwrap();

    let mut worst = 0f64;
    let mut noise = CountingNoise { draws: 0 };
    {
        let _guard = GLOBAL_RNG.lock();
        tch::manual_seed(seed);
        let mut x = sample0.copy();
        let ts = s.timesteps().to_vec();
        for (i, &t) in ts.iter().enumerate() {
            let input = s.scale_model_input(&x, t).unwrap();
            assert_eq!(rel_err(&input, &x), 0.0, "{name}: scale_model_input");
            let out = outputs.get(i as i64);
            x = s.step(&out, t, &x, &mut noise).unwrap();
            let err = rel_err(&x, &samples.get(i as i64));
            assert!(
                err <= TOLERANCE,
                "{name}: step {i} (t = {t}) relative error {err:e}"
            );
            worst = worst.max(err);
        }
    }
    assert_eq!(noise.draws, expected_draws, "{name}: noise drawn");

    let original = &tensors[&format!("{name}/an_original")];
    let an_noise = &tensors[&format!("{name}/an_noise")];
    let results = &tensors[&format!("{name}/an_result")];
    let mut worst_an = 0f64;
    for (k, t) in case["add_noise_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let t = t.as_f64().unwrap();
        let got = s.add_noise(original, an_noise, t).unwrap();
        let err = rel_err(&got, &results.get(k as i64));
        assert!(err <= TOLERANCE, "{name}: add_noise at t = {t}: {err:e}");
        worst_an = worst_an.max(err);
    }
    (worst, worst_an)
}

#[test]
fn diffusers_cases() {
    let doc = common::scheduler_cases("schedulers");
    let tensors = common::scheduler_tensors("schedulers");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut worst = (0f64, String::from("none"));
    let mut worst_an = 0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (err, err_an) = run_case(case, &config_of(case), &tensors, true);
        println!(
            "{name:45} steps {:4}  max rel err {err:.3e}  add_noise {err_an:.3e}",
            case["num_inference_steps"]
        );
        if err > worst.0 {
            worst = (err, name.to_string());
        }
        worst_an = worst_an.max(err_an);
    }
    println!(
        "{} cases; worst step error {:.3e} ({}), worst add_noise error {:.3e}",
        cases.len(),
        worst.0,
        worst.1,
        worst_an
    );
}

/// diffusers 0.42.1 computes `fixed_large_log` as √(log β) (NaN); here it is exp(½ log β) = √β,
/// so it must match the `fixed_large` fixture.
#[test]
fn fixed_large_log_is_fixed_large() {
    let doc = common::scheduler_cases("schedulers");
    let tensors = common::scheduler_tensors("schedulers");
    let case = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ddpm_sd_trailing_v_large_10")
        .unwrap();
    let mut config = config_of(case);
    config.variance_type = Some(stable_diffusion::schedulers::VarianceType::FixedLargeLog);
    let (err, _) = run_case(case, &config, &tensors, true);
    println!("fixed_large_log vs fixed_large: {err:.3e}");
}

#[test]
fn timestep_grid() {
    let doc = common::scheduler_cases("schedulers");
    let grid = doc["timestep_grid"].as_array().unwrap();
    let (mut checked, mut minus_one, mut out_of_range) = (0, 0, 0);
    for entry in grid {
        let mut diffusers: Vec<i64> = entry["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let n = entry["num_inference_steps"].as_u64().unwrap() as usize;
        let n_train = entry["num_train_timesteps"].as_i64().unwrap();
        let json = serde_json::json!({
            "_class_name": entry["class_name"],
            "num_train_timesteps": n_train,
            "timestep_spacing": entry["timestep_spacing"],
            "steps_offset": entry["steps_offset"],
        });
        let config = SchedulerConfig::from_json_str(&json.to_string()).unwrap();
        let mut s = scheduler_from_config(&config).unwrap();
        let result = s.set_timesteps(n);
        // diffusers' trailing spacing sometimes appends a timestep of -1 (one step too many).
        if diffusers.len() == n + 1 && diffusers.last() == Some(&-1) {
            diffusers.pop();
            minus_one += 1;
        }
        if diffusers.iter().any(|&t| t >= n_train) {
            let err = result.expect_err("timestep beyond training range must be an error");
            assert!(err.to_string().contains("outside"), "{err}");
            out_of_range += 1;
            continue;
        }
        result.unwrap();
        let got: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(got, diffusers, "{entry}");
        assert_eq!(got.len(), n);
        checked += 1;
    }
    println!(
        "timestep grid: {checked} equal, {minus_one} with diffusers' trailing -1 dropped, {out_of_range} out of range"
    );
    assert!(checked > 150);
    assert!(minus_one > 0);
}

#[test]
fn set_timesteps_bounds() {
    // The DDPM/DDIM family; the other families have their own bounds tests.
    for name in ["ddim", "ddpm"] {
        let mut s = scheduler_from_name(name, &SchedulerConfig::default()).unwrap();
        contains_all(&err_text(s.set_timesteps(0)), &["num_inference_steps", "0"]);
        contains_all(
            &err_text(s.set_timesteps(1001)),
            &["num_inference_steps", "1001", "num_train_timesteps"],
        );
        s.set_timesteps(1000).unwrap();
        assert_eq!(s.timesteps().len(), 1000);
        assert_eq!(s.init_noise_sigma(), 1.0);
    }
    // leading + steps_offset with as many steps as training steps reaches timestep 1000.
    let config = SchedulerConfig::from_json_str(r#"{"steps_offset": 1}"#).unwrap();
    let mut s = DdimScheduler::new(&config).unwrap();
    contains_all(&err_text(s.set_timesteps(1000)), &["1000", "steps_offset"]);
}

#[test]
fn names() {
    for expected in ["ddim", "ddpm"] {
        assert!(scheduler_names().contains(&expected), "{expected} missing");
    }
    let c = SchedulerConfig::default();
    for name in [
        "ddim",
        "DDIM",
        "DDIMScheduler",
        "ddimscheduler",
        "ddpm",
        "DDPMScheduler",
    ] {
        scheduler_from_name(name, &c).unwrap();
    }
    let e = scheduler_from_name("no_such_sampler", &c).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)));
    contains_all(
        &e.to_string(),
        &[
            "no_such_sampler",
            "ddim",
            "ddpm",
            "DDIMScheduler",
            "DDPMScheduler",
        ],
    );

    let e = scheduler_from_config(&c).err().unwrap();
    contains_all(&e.to_string(), &["_class_name", "ddim"]);
    let unknown = c.clone().with_class_name("FlowMatchEulerDiscreteScheduler");
    let e = scheduler_from_config(&unknown).err().unwrap();
    assert!(matches!(e, Error::Unsupported(_)));
    contains_all(
        &e.to_string(),
        &["FlowMatchEulerDiscreteScheduler", "DDIMScheduler"],
    );
    let ddpm = c.with_class_name("DDPMScheduler");
    scheduler_from_config(&ddpm).unwrap();
}

#[test]
fn bad_config_values() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"beta_schedule": "foo"}"#,
            &[
                "beta_schedule",
                "foo",
                "linear",
                "scaled_linear",
                "squaredcos_cap_v2",
            ],
        ),
        (
            r#"{"prediction_type": "eps"}"#,
            &[
                "prediction_type",
                "eps",
                "epsilon",
                "v_prediction",
                "sample",
            ],
        ),
        (
            r#"{"timestep_spacing": "even"}"#,
            &[
                "timestep_spacing",
                "even",
                "leading",
                "trailing",
                "linspace",
            ],
        ),
        (
            r#"{"variance_type": "small"}"#,
            &["variance_type", "small", "fixed_small", "fixed_large"],
        ),
        (r#"{"steps_offset": "1"}"#, &["steps_offset", "string"]),
        (r#"{"clip_sample": 1}"#, &["clip_sample"]),
        (r#"{"num_train_timesteps": -5}"#, &["num_train_timesteps"]),
        (r#"{"trained_betas": [0.1, "x"]}"#, &["trained_betas"]),
        (r#"[1, 2]"#, &["object"]),
        (r#"{"beta_start": "#, &["JSON"]),
    ];
    for (json, parts) in cases {
        let e = SchedulerConfig::from_json_str(json).err().unwrap();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        contains_all(&e.to_string(), parts);
    }

    // Values that parse but a scheduler rejects.
    let reject: &[(&str, &str, &[&str])] = &[
        (
            "ddim",
            r#"{"beta_schedule": "sigmoid"}"#,
            &["sigmoid", "DDIMScheduler", "linear"],
        ),
        (
            "ddpm",
            r#"{"variance_type": "learned_range"}"#,
            &["learned_range", "fixed_small"],
        ),
        (
            "ddpm",
            r#"{"num_train_timesteps": 0}"#,
            &["num_train_timesteps"],
        ),
        (
            "ddim",
            r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#,
            &["trained_betas", "2", "3"],
        ),
        (
            "ddim",
            r#"{"trained_betas": [0.1, 1.5], "num_train_timesteps": 2}"#,
            &["trained_betas", "1.5"],
        ),
        (
            "ddpm",
            r#"{"thresholding": true, "dynamic_thresholding_ratio": 1.5}"#,
            &["dynamic_thresholding_ratio", "1.5"],
        ),
        (
            "ddim",
            r#"{"clip_sample_range": -1}"#,
            &["clip_sample_range"],
        ),
        (
            "ddim",
            r#"{"beta_schedule": "scaled_linear", "beta_start": -0.1}"#,
            &["beta_start"],
        ),
    ];
    for (name, json, parts) in reject {
        let config = SchedulerConfig::from_json_str(json).unwrap();
        let msg = err_text(scheduler_from_name(name, &config));
        contains_all(&msg, parts);
    }

    // from_file names the file and the field.
    let dir = std::env::temp_dir().join(format!("sd-sched-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "foo"}"#,
    )
    .unwrap();
    let e = SchedulerConfig::from_file(&path).err().unwrap();
    assert!(matches!(e, Error::BadModel(_)), "{e}");
    contains_all(
        &e.to_string(),
        &["scheduler_config.json", "beta_schedule", "foo", "linear"],
    );
    std::fs::write(&path, "{").unwrap();
    assert!(matches!(
        SchedulerConfig::from_file(&path),
        Err(Error::Json { .. })
    ));
    let e = SchedulerConfig::from_file(&dir.join("missing.json"))
        .err()
        .unwrap();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn real_config_with_nulls_and_extra_fields() {
    // Stable Diffusion 1.5's scheduler_config.json.
    let json = r#"{
      "_class_name": "PNDMScheduler",
      "_diffusers_version": "0.6.0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "num_train_timesteps": 1000,
      "set_alpha_to_one": false,
      "skip_prk_steps": true,
      "steps_offset": 1,
      "trained_betas": null,
      "clip_sample": false
    }"#;
    let c = SchedulerConfig::from_json_str(json).unwrap();
    assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
    assert!(c.trained_betas.is_none());
    assert_eq!(c.extra.get("skip_prk_steps"), Some(&Value::Bool(true)));
    let mut s = scheduler_from_name("ddim", &c).unwrap();
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps()[0], 981.0);
    assert_eq!(*s.timesteps().last().unwrap(), 1.0);
}

#[test]
fn argument_errors() {
    let c = SchedulerConfig::default();
    // DDIM needs set_timesteps before step.
    let mut ddim = DdimScheduler::new(&c).unwrap();
    let x = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
    contains_all(
        &err_text(ddim.step(&x, 999.0, &x, &mut GlobalNoise)),
        &["set_timesteps"],
    );
    contains_all(&err_text(ddim.set_eta(-0.5)), &["eta", "-0.5"]);
    contains_all(&err_text(ddim.set_eta(f64::NAN)), &["eta"]);
    let ddim = ddim.with_eta(0.25).unwrap();
    assert_eq!(ddim.eta(), 0.25);

    let mut ddpm = DdpmScheduler::new(&c).unwrap();
    ddpm.set_timesteps(10).unwrap();
    contains_all(
        &err_text(ddpm.step(&x, 550.0, &x, &mut GlobalNoise)),
        &["timestep 550"],
    );
    contains_all(
        &err_text(ddpm.step(&x, 900.5, &x, &mut GlobalNoise)),
        &["900.5"],
    );
    let y = Tensor::zeros([1, 4, 2, 3], (tch::Kind::Float, tch::Device::Cpu));
    contains_all(
        &err_text(ddpm.step(&y, 900.0, &x, &mut GlobalNoise)),
        &["shape"],
    );
    for t in [-1.0, 1000.0, 0.5, f64::NAN] {
        contains_all(&err_text(ddpm.add_noise(&x, &x, t)), &["timestep"]);
    }
    contains_all(&err_text(ddpm.add_noise(&x, &y, 10.0)), &["shape"]);
    // eta is ignored by DDPM (as in diffusers' pipelines), but still checked.
    ddpm.set_eta(0.5).unwrap();
    assert!(ddpm.set_eta(-1.0).is_err());
}
