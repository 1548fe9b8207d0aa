//! DPM-Solver++ (2M, 2M SDE, 3M; Karras / Lu / exponential noise levels), UniPC and LCM
//! against diffusers 0.42.1 (fixtures from tools/fixtures/schedulers_multistep.py), plus name
//! lookup and error reporting.
mod common;

use common::{config_of, f64s, rel_err, CountingNoise};
use serde_json::Value;
use stable_diffusion::rng::{GlobalNoise, GLOBAL_RNG};
use stable_diffusion::schedulers::{
    a1111_scheduler_names, scheduler_from_config, scheduler_from_name, scheduler_names,
    DpmSolverMultistepScheduler, LcmScheduler, Scheduler, SchedulerConfig, UniPcMultistepScheduler,
};
use stable_diffusion::{Error, Result};
use std::collections::HashMap;
use tch::Tensor;

/// Samples after every step: max |Δ| / max |ref|.
/// libtorch's float32 kernels round differently from one CPU to another (AVX2 against
/// AVX-512 paths of `exp`, `log`, reductions), and the references were made on one CPU: a
/// few float32 rounding steps of slack keep the tests meaning the same on every machine.
const TOLERANCE: f64 = 4e-5;
/// Noise levels, relative: a small σ = sqrt((1 - ᾱ) / ᾱ), with ᾱ near 1, moves by about
/// 3e-6 for each float32 rounding step of ᾱ, so a few such steps.
const SIGMA_TOLERANCE: f64 = 1.5e-5;

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The concrete scheduler's noise levels after `set_timesteps(steps)` (None for LCM).
fn sigmas_of(class: &str, config: &SchedulerConfig, steps: usize) -> Result<Option<Vec<f32>>> {
    Ok(match class {
        "DPMSolverMultistepScheduler" => {
            let mut s = DpmSolverMultistepScheduler::new(config)?;
            s.set_timesteps(steps)?;
            Some(s.sigmas().to_vec())
        }
        "UniPCMultistepScheduler" => {
            let mut s = UniPcMultistepScheduler::new(config)?;
            s.set_timesteps(steps)?;
            Some(s.sigmas().to_vec())
        }
        "LCMScheduler" => {
            let mut s = LcmScheduler::new(config)?;
            s.set_timesteps(steps)?;
            None
        }
        other => panic!("unexpected class {other}"),
    })
}

/// diffusers' timesteps with the trailing-spacing artefact (a final −1 beyond n entries)
/// dropped, and whether it was there.
fn expected_timesteps(raw: &[i64], n: usize) -> (Vec<i64>, bool) {
    let mut ts = raw.to_vec();
    let mut dropped = false;
    while ts.len() > n && ts.last().is_some_and(|&t| t < 0) {
        ts.pop();
        dropped = true;
    }
    (ts, dropped)
}

/// Worst relative error of our σ (f32) against diffusers'; checks the count.
fn sigma_error(ours: &[f32], theirs: &[f64], dropped: bool, what: &str) -> f64 {
    let theirs: Vec<f64> = if dropped {
        // diffusers' extra step at t = −1 has its own σ before the final one.
        let mut v = theirs[..theirs.len() - 2].to_vec();
        v.push(*theirs.last().unwrap());
        v
    } else {
        theirs.to_vec()
    };
    assert_eq!(ours.len(), theirs.len(), "{what}: number of sigmas");
    let mut worst = 0f64;
    for (k, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
        let err = if b == 0.0 {
            (a as f64).abs()
        } else {
            ((a as f64 - b) / b).abs()
        };
        assert!(err <= SIGMA_TOLERANCE, "{what}: sigma {k}: {a} vs {b}");
        worst = worst.max(err);
    }
    worst
}

struct CaseResult {
    step_err: f64,
    add_noise_err: f64,
    steps_run: usize,
}

/// Runs one fixture case, with the scheduler built by class name from the compact config, or
/// (`full`) by `scheduler_from_config` from the complete config JSON diffusers saves.
fn run_case(case: &Value, tensors: &HashMap<String, Tensor>, full: bool) -> CaseResult {
    let name = case["name"].as_str().unwrap();
    let class = case["class_name"].as_str().unwrap();
    let config = if full {
        SchedulerConfig::from_json_str(case["config_json"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{name}: full config: {e}"))
    } else {
        config_of(case)
    };
    let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
    let mut s = if full {
        scheduler_from_config(&config).expect("scheduler builds from its class name")
    } else {
        scheduler_from_name(class, &config).expect("scheduler builds")
    };
    s.set_timesteps(steps).unwrap();

    let (expected_ts, dropped) = expected_timesteps(&ints(&case["timesteps"]), steps);
    assert!(!dropped, "{name}: cases avoid diffusers' extra −1 timestep");
    let got_ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
    assert!(s.timesteps().iter().all(|t| t.fract() == 0.0), "{name}");
    assert_eq!(got_ts, expected_ts, "{name}: timesteps");
    if let Some(theirs) = case["sigmas"].as_array() {
        let theirs: Vec<f64> = theirs.iter().map(|v| v.as_f64().unwrap()).collect();
        let ours = sigmas_of(class, &config, steps).unwrap().unwrap();
        sigma_error(&ours, &theirs, false, name);
    }
    assert_eq!(
        s.init_noise_sigma(),
        case["init_noise_sigma"].as_f64().unwrap(),
        "{name}: init_noise_sigma"
    );
    assert_eq!(s.order() as u64, case["order"].as_u64().unwrap(), "{name}");
    let expected_draws = case["noise_draws"].as_u64().unwrap() as usize;

    let original = &tensors[&format!("{name}/an_original")];
    let an_noise = &tensors[&format!("{name}/an_noise")];
    let mut worst_an = 0f64;
    // add_noise before any step, without a begin index: by timestep value.
    let before = &tensors[&format!("{name}/an_before")];
    for (k, t) in ints(&case["add_noise_timesteps"]).iter().enumerate() {
        let got = s.add_noise(original, an_noise, *t as f64).unwrap();
        let err = rel_err(&got, &before.get(k as i64));
        assert!(err <= TOLERANCE, "{name}: add_noise at t = {t}: {err:e}");
        worst_an = worst_an.max(err);
    }

    let begin = case["begin_index"].as_u64().map(|b| b as usize);
    let sample0 = &tensors[&format!("{name}/sample0")];
    if let Some(b) = begin {
        s.set_begin_index(b);
        let t0 = s.timesteps()[b];
        let start = s.add_noise(original, an_noise, t0).unwrap();
        let err = rel_err(&start, sample0);
        assert!(err <= TOLERANCE, "{name}: img2img start latents {err:e}");
        worst_an = worst_an.max(err);
    }
    let begin = begin.unwrap_or(0);
    let run_ts: Vec<f64> = s.timesteps()[begin..].to_vec();
    assert!(
        s.noise_draws() >= expected_draws,
        "{name}: noise_draws() {} < {expected_draws}",
        s.noise_draws()
    );
    if begin == 0 {
        assert_eq!(s.noise_draws(), expected_draws, "{name}: noise_draws()");
    }

    let outputs = &tensors[&format!("{name}/model_outputs")];
    let samples = &tensors[&format!("{name}/samples")];
    let during = tensors.get(&format!("{name}/an_during"));
    let seed = case["seed"].as_i64().unwrap();
    let mut worst = 0f64;
    let mut noise = CountingNoise { draws: 0 };
    {
        let _guard = GLOBAL_RNG.lock();
        tch::manual_seed(seed);
        let mut x = sample0.copy();
        for (i, &t) in run_ts.iter().enumerate() {
            let input = s.scale_model_input(&x, t).unwrap();
            assert_eq!(rel_err(&input, &x), 0.0, "{name}: scale_model_input");
            x = s.step(&outputs.get(i as i64), t, &x, &mut noise).unwrap();
            let err = rel_err(&x, &samples.get(i as i64));
            assert!(
                err <= TOLERANCE,
                "{name}: step {i} (t = {t}) relative error {err:e}"
            );
            worst = worst.max(err);
            if let (Some(during), Some(&next)) = (during, run_ts.get(i + 1)) {
                let got = s.add_noise(original, an_noise, next).unwrap();
                let err = rel_err(&got, &during.get(i as i64));
                assert!(
                    err <= TOLERANCE,
                    "{name}: add_noise after step {i}: {err:e}"
                );
                worst_an = worst_an.max(err);
            }
        }
    }
    assert_eq!(noise.draws, expected_draws, "{name}: noise drawn");
    CaseResult {
        step_err: worst,
        add_noise_err: worst_an,
        steps_run: run_ts.len(),
    }
}

#[test]
fn diffusers_cases() {
    let doc = common::scheduler_cases("schedulers_multistep");
    let tensors = common::scheduler_tensors("schedulers_multistep");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let mut per_class: HashMap<String, (usize, f64, String)> = HashMap::new();
    let mut worst_an = 0f64;
    let mut total_steps = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let class = case["class_name"].as_str().unwrap().to_string();
        let r = run_case(case, &tensors, false);
        println!(
            "{name:44} steps {:3}  max rel err {:.3e}  add_noise {:.3e}",
            r.steps_run, r.step_err, r.add_noise_err
        );
        let entry = per_class.entry(class).or_insert((0, 0.0, String::new()));
        entry.0 += 1;
        if r.step_err >= entry.1 {
            entry.1 = r.step_err;
            entry.2 = name.to_string();
        }
        worst_an = worst_an.max(r.add_noise_err);
        total_steps += r.steps_run;
    }
    let mut classes: Vec<_> = per_class.into_iter().collect();
    classes.sort_by(|a, b| a.0.cmp(&b.0));
    for (class, (count, err, name)) in &classes {
        println!("{class}: {count} cases, worst step error {err:.3e} ({name})");
    }
    println!(
        "{} cases, {total_steps} steps; worst add_noise error {worst_an:.3e}",
        cases.len()
    );
}

/// The same loops with the complete configs diffusers writes (Python's `-Infinity`, nulls,
/// fields no scheduler here reads), chosen by their `_class_name`.
#[test]
fn diffusers_cases_from_saved_configs() {
    let doc = common::scheduler_cases("schedulers_multistep");
    let tensors = common::scheduler_tensors("schedulers_multistep");
    let cases = doc["cases"].as_array().unwrap();
    let mut worst = 0f64;
    for case in cases {
        worst = worst.max(run_case(case, &tensors, true).step_err);
    }
    // And one through a file, as a model folder's scheduler_config.json.
    let case = &cases[0];
    let dir = std::env::temp_dir().join(format!("sd-multistep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, case["config_json"].as_str().unwrap()).unwrap();
    let from_file = SchedulerConfig::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let mut s = scheduler_from_config(&from_file).unwrap();
    s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
        .unwrap();
    let got: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
    assert_eq!(got, ints(&case["timesteps"]));
    println!(
        "{} cases from saved configs, worst step error {worst:.3e}",
        cases.len()
    );
}

#[test]
fn timestep_and_sigma_grid() {
    let doc = common::scheduler_cases("schedulers_multistep");
    let grid = doc["grid"].as_array().unwrap();
    let (mut checked, mut sigma_lists, mut errors, mut dropped_count) = (0, 0, 0, 0);
    let mut worst_sigma = 0f64;
    for entry in grid {
        let class = entry["class_name"].as_str().unwrap();
        let config = config_of(entry);
        let steps = entry["num_inference_steps"].as_u64().unwrap() as usize;
        let what = format!("{class} {} {steps}", entry["config"]);
        let mut s = scheduler_from_name(class, &config).unwrap();
        if entry.get("error").is_some() {
            assert!(s.set_timesteps(steps).is_err(), "{what}: should fail");
            errors += 1;
            continue;
        }
        s.set_timesteps(steps)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (expected, dropped) = expected_timesteps(&ints(&entry["timesteps"]), steps);
        let got: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(got, expected, "{what}: timesteps");
        if dropped {
            dropped_count += 1;
        }
        if entry["sigmas"].is_array() {
            let ours = sigmas_of(class, &config, steps).unwrap().unwrap();
            worst_sigma =
                worst_sigma.max(sigma_error(&ours, &f64s(&entry["sigmas"]), dropped, &what));
            sigma_lists += 1;
        }
        checked += 1;
    }
    assert!(checked > 400);
    println!(
        "{checked} timestep lists ({dropped_count} without diffusers' extra −1), {sigma_lists} sigma lists (worst relative error {worst_sigma:.2e}), {errors} rejected step counts"
    );
}

fn timesteps_for(name: &str, config: &SchedulerConfig, steps: usize) -> (Vec<f64>, usize) {
    let mut s = scheduler_from_name(name, config).unwrap_or_else(|e| panic!("{name}: {e}"));
    s.set_timesteps(steps).unwrap();
    (s.timesteps().to_vec(), s.noise_draws())
}

#[test]
fn names_and_overrides() {
    let sd = SchedulerConfig::from_json_str(
        r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": true,
            "set_alpha_to_one": false, "clip_sample": false}"#,
    )
    .unwrap();
    for short in ["dpmpp_2m", "unipc", "lcm"] {
        assert!(scheduler_names().contains(&short), "{short}");
    }
    for a1111 in [
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Karras",
        "UniPC",
        "LCM",
    ] {
        assert!(a1111_scheduler_names().contains(&a1111), "{a1111}");
    }
    let with = |extra: &str| {
        SchedulerConfig::from_json_str(&format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "steps_offset": 1{extra}}}"#
        ))
        .unwrap()
    };
    let groups: &[(&[&str], SchedulerConfig, usize)] = &[
        (
            &[
                "DPMSolverMultistepScheduler",
                "dpmpp_2m",
                "DPM++ 2M",
                "dpm++ 2m",
            ],
            with(""),
            0,
        ),
        (
            &["dpmpp_2m_karras", "DPM++ 2M Karras", "dpm++ 2m KARRAS"],
            with(r#", "use_karras_sigmas": true"#),
            0,
        ),
        (
            &["dpmpp_2m_sde", "DPM++ 2M SDE"],
            with(r#", "algorithm_type": "sde-dpmsolver++""#),
            10,
        ),
        (
            &[
                "dpmpp_2m_sde_karras",
                "DPM++ 2M SDE Karras",
                " dpm++ 2m sde karras ",
            ],
            with(r#", "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": true"#),
            10,
        ),
        (
            &["UniPCMultistepScheduler", "unipc", "UniPC", "UNIPC"],
            with(""),
            0,
        ),
        (&["LCMScheduler", "lcm", "LCM"], with(""), 9),
    ];
    for (names, reference_config, draws) in groups {
        // The reference: the class itself, built from a config with the overrides spelled out.
        let class = names[0];
        let class = match class {
            "dpmpp_2m_karras" | "dpmpp_2m_sde" | "dpmpp_2m_sde_karras" => {
                "DPMSolverMultistepScheduler"
            }
            c => c,
        };
        let (reference, ref_draws) = timesteps_for(class, reference_config, 10);
        assert_eq!(ref_draws, *draws, "{class}: noise draws");
        for name in names.iter() {
            let (ts, d) = timesteps_for(name, &sd, 10);
            assert_eq!(ts, reference, "{name}: timesteps");
            assert_eq!(d, *draws, "{name}: noise draws");
        }
    }
    // Karras timesteps for SD, 10 steps (from diffusers).
    let (karras, _) = timesteps_for("DPM++ 2M Karras", &sd, 10);
    assert_eq!(&karras[..3], &[999.0, 916.0, 815.0]);
    // LCM ignores the spacing settings.
    let (lcm, _) = timesteps_for("LCM", &sd, 4);
    assert_eq!(lcm, vec![999.0, 759.0, 499.0, 259.0]);

    // By the config's class name, with the class defaults for missing fields.
    for class in [
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "LCMScheduler",
    ] {
        let config = SchedulerConfig::default().with_class_name(class);
        let mut s = scheduler_from_config(&config).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps().len(), 4, "{class}");
    }
}

#[test]
fn errors_name_the_problem() {
    let msg = |r: Result<Box<dyn Scheduler>>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    };
    let cfg = |json: &str| SchedulerConfig::from_json_str(json).unwrap();
    let dpm = "DPMSolverMultistepScheduler";

    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"algorithm_type": "dpmsolver"}"#),
    ));
    assert!(
        e.contains("algorithm_type") && e.contains("dpmsolver"),
        "{e}"
    );
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"algorithm_type": "magic"}"#),
    ));
    assert!(
        e.contains("algorithm_type") && e.contains("sde-dpmsolver++"),
        "{e}"
    );
    let e = msg(scheduler_from_name(dpm, &cfg(r#"{"solver_order": "two"}"#)));
    assert!(e.contains("solver_order"), "{e}");
    let e = msg(scheduler_from_name(dpm, &cfg(r#"{"solver_order": 0}"#)));
    assert!(e.contains("solver_order"), "{e}");
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"final_sigmas_type": "max"}"#),
    ));
    assert!(e.contains("final_sigmas_type"), "{e}");
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"algorithm_type": "deis"}"#),
    ));
    assert!(e.contains("sigma_min"), "{e}");
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"use_flow_sigmas": true}"#),
    ));
    assert!(e.contains("use_flow_sigmas"), "{e}");
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"variance_type": "learned_range"}"#),
    ));
    assert!(e.contains("variance"), "{e}");
    let e = msg(scheduler_from_name(
        dpm,
        &cfg(r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#),
    ));
    assert!(e.contains("only one"), "{e}");
    let e = msg(scheduler_from_name(
        "unipc",
        &cfg(r#"{"disable_corrector": [0, "x"]}"#),
    ));
    assert!(e.contains("disable_corrector"), "{e}");
    let e = msg(scheduler_from_name(
        "unipc",
        &cfg(r#"{"solver_type": "bh3"}"#),
    ));
    assert!(e.contains("solver_type") && e.contains("bh2"), "{e}");
    let e = msg(scheduler_from_name(
        "lcm",
        &cfg(r#"{"timestep_scaling": "ten"}"#),
    ));
    assert!(e.contains("timestep_scaling"), "{e}");

    // Step counts.
    for name in ["dpmpp_2m", "unipc", "lcm"] {
        let mut s = scheduler_from_name(name, &SchedulerConfig::default()).unwrap();
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            s.set_timesteps(1001),
            Err(Error::InvalidArgument(_))
        ));
    }
    let mut lcm = scheduler_from_name("lcm", &SchedulerConfig::default()).unwrap();
    let e = lcm.set_timesteps(51).unwrap_err().to_string();
    assert!(e.contains("original_inference_steps"), "{e}");

    // Stepping before set_timesteps, past the end, or with mismatched shapes.
    let x = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
    for name in ["dpmpp_2m", "unipc", "lcm"] {
        let mut s = scheduler_from_name(name, &SchedulerConfig::default()).unwrap();
        let mut noise = GlobalNoise;
        assert!(s.step(&x, 999.0, &x, &mut noise).is_err(), "{name}");
        s.set_timesteps(2).unwrap();
        let bad = Tensor::zeros([1, 3, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        assert!(s.step(&bad, 999.0, &x, &mut noise).is_err(), "{name}");
    }
    for name in ["dpmpp_2m", "unipc"] {
        let mut s = scheduler_from_name(name, &SchedulerConfig::default()).unwrap();
        s.set_timesteps(2).unwrap();
        let ts = s.timesteps().to_vec();
        let mut noise = GlobalNoise;
        let mut y = x.copy();
        for &t in &ts {
            y = s.step(&x, t, &y, &mut noise).unwrap();
        }
        let e = s.step(&x, ts[1], &y, &mut noise).unwrap_err().to_string();
        assert!(e.contains("set_timesteps"), "{name}: {e}");
    }
    let mut s = scheduler_from_name("lcm", &SchedulerConfig::default()).unwrap();
    s.set_timesteps(2).unwrap();
    let e = s
        .step(&x, 5.0, &x, &mut GlobalNoise)
        .unwrap_err()
        .to_string();
    assert!(e.contains("timestep 5"), "{e}");
}

/// A fresh `set_timesteps` forgets the previous run (multistep history, begin index).
#[test]
fn set_timesteps_resets_state() {
    let doc = common::scheduler_cases("schedulers_multistep");
    let tensors = common::scheduler_tensors("schedulers_multistep");
    for name in [
        "dpmpp2m_eps_leading_10",
        "unipc_v_trailing_10",
        "dpmpp2msde_karras_eps_10",
        "lcm_eps_4",
    ] {
        let case = doc["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let class = case["class_name"].as_str().unwrap();
        let config = config_of(case);
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let mut s = scheduler_from_name(class, &config).unwrap();
        // A half-run with a begin index first.
        s.set_timesteps(steps).unwrap();
        s.set_begin_index(1);
        let sample0 = &tensors[&format!("{name}/sample0")];
        let outputs = &tensors[&format!("{name}/model_outputs")];
        let _guard = GLOBAL_RNG.lock();
        let mut noise = GlobalNoise;
        let t1 = s.timesteps()[1];
        let _ = s.step(&outputs.get(0), t1, sample0, &mut noise).unwrap();
        // Then the real run.
        s.set_timesteps(steps).unwrap();
        tch::manual_seed(case["seed"].as_i64().unwrap());
        let mut x = sample0.copy();
        let ts = s.timesteps().to_vec();
        for (i, &t) in ts.iter().enumerate() {
            x = s.step(&outputs.get(i as i64), t, &x, &mut noise).unwrap();
        }
        let samples = &tensors[&format!("{name}/samples")];
        let err = rel_err(&x, &samples.get(ts.len() as i64 - 1));
        assert!(err <= TOLERANCE, "{name}: {err:e}");
    }
}
