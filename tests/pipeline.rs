//! The whole txt2img pipeline against diffusers' StableDiffusionPipeline on the tiny fixtures:
//! same components, seed, steps, guidance and scheduler give the same float image.
mod common;

use common::{assert_close, cases, fixtures, Refs};
use stable_diffusion::pipeline::{Control, GenerateParams, LoadOptions, StableDiffusion, StepInfo};
use stable_diffusion::Error;

#[test]
fn txt2img_matches_diffusers() {
    for model in ["tiny-sd1", "tiny-sd2"] {
        let sd = common::load_model(model);
        let refs = Refs::open(model);
        for case in cases(model)["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let params = common::case_params(case);
            common::check_txt2img_case(&format!("{model}/{name}"), &sd, &params, case, &refs);
        }
    }
}

/// libtorch's generator is process-wide: a model built with random initial values on another
/// thread (training, a test, a user's own code through the library) must not land inside a
/// seeded run's draws. The seeded image stays diffusers' while UNets are built meanwhile.
#[test]
fn seeded_runs_ignore_models_built_on_other_threads() {
    use stable_diffusion::models::{UNet2DConditionModel, UNetConfig};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let model = "tiny-sd1";
    let sd = common::load_model(model);
    let refs = Refs::open(model);
    let case = &cases(model)["cases"][0];
    let name = case["name"].as_str().unwrap();
    let params = common::case_params(case);
    let cfg = UNetConfig::from_file(&fixtures().join(model).join("unet/config.json")).unwrap();
    let stop = AtomicBool::new(false);
    let built = AtomicUsize::new(0);
    let images = std::thread::scope(|scope| {
        scope.spawn(|| {
            // One OpenMP thread here (a per-thread setting): two threads' parallel regions
            // fighting over the cores would make the seeded runs many times slower.
            tch::set_num_threads(1);
            while !stop.load(Ordering::Relaxed) {
                let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
                built.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Rendered first, compared after the builder has stopped: a failed comparison inside
        // the scope would leave the builder running and the scope waiting for it.
        let images: Vec<_> = (0..8).map(|_| sd.txt2img(&params, None)).collect();
        stop.store(true, Ordering::Relaxed);
        images
    });
    for (round, image) in images.into_iter().enumerate() {
        assert_close(
            &format!("{model}/{name}, round {round}, with models built meanwhile"),
            &image.unwrap().pixels,
            &refs.get(&format!("pipe_{name}")),
            1e-3,
        );
    }
    assert!(
        built.load(Ordering::Relaxed) > 0,
        "no model was built meanwhile"
    );
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let sd = common::load_model("tiny-sd1");
    let p = GenerateParams {
        prompt: "a blue square".into(),
        steps: 3,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let a = sd.txt2img(&p, None).unwrap().to_rgb8().unwrap();
    let b = sd.txt2img(&p, None).unwrap().to_rgb8().unwrap();
    assert_eq!(a, b);
    let c = sd
        .txt2img(&GenerateParams { seed: 1, ..p }, None)
        .unwrap()
        .to_rgb8()
        .unwrap();
    assert_ne!(a, c);
}

#[test]
fn callback_cancels_the_run() {
    let sd = common::load_model("tiny-sd1");
    let p = GenerateParams {
        prompt: "x".into(),
        steps: 5,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let mut calls = 0;
    let mut on_step = |info: &StepInfo| {
        calls += 1;
        assert_eq!(info.total, 5);
        assert_eq!(info.latents.size(), vec![1, 4, 16, 16]);
        if info.step == 2 {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let err = sd
        .txt2img(&p, Some(&mut on_step))
        .err()
        .expect("cancelled run must fail");
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(calls, 2);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let sd = common::load_model("tiny-sd1");
    let base = GenerateParams {
        prompt: "x".into(),
        steps: 2,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let cases: Vec<(GenerateParams, &str)> = vec![
        (
            GenerateParams {
                width: Some(33),
                ..base.clone()
            },
            "width",
        ),
        (
            GenerateParams {
                height: Some(0),
                ..base.clone()
            },
            "height",
        ),
        (
            GenerateParams {
                steps: 0,
                ..base.clone()
            },
            "steps",
        ),
        (
            GenerateParams {
                batch: 0,
                ..base.clone()
            },
            "batch",
        ),
        (
            GenerateParams {
                guidance: f64::NAN,
                ..base.clone()
            },
            "guidance",
        ),
        (
            GenerateParams {
                scheduler: Some("nope".into()),
                ..base.clone()
            },
            "nope",
        ),
    ];
    for (p, needle) in cases {
        let err = sd.txt2img(&p, None).err().expect("must fail").to_string();
        assert!(
            err.contains(needle),
            "error `{err}` should mention `{needle}`"
        );
    }
}

#[test]
fn load_errors_name_the_problem() {
    let err = StableDiffusion::load(
        std::path::Path::new("/nonexistent/model"),
        &LoadOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
}

/// txt2img with every scheduler family, chosen by its A1111 name, against diffusers'
/// StableDiffusionPipeline with `Cls.from_config(config, **overrides)`.
#[test]
fn txt2img_with_each_scheduler_matches_diffusers() {
    let sd = common::load_model("tiny-sd1");
    let refs = Refs::open("scheduler-pipeline");
    let all = cases("scheduler-pipeline");
    let list = all["cases"].as_array().unwrap();
    assert!(list.len() >= 10, "expected a case per scheduler");
    for case in list {
        let name = case["name"].as_str().unwrap();
        let params = GenerateParams {
            scheduler: Some(case["a1111"].as_str().unwrap().to_string()),
            ..common::case_params(case)
        };
        let mut seen = Vec::new();
        let mut on_step = |info: &StepInfo| {
            seen.push(info.timestep);
            Control::Continue
        };
        let images = sd
            .txt2img(&params, Some(&mut on_step))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected_t: Vec<f64> = common::f64s(&case["timesteps"]);
        assert_eq!(seen.len(), expected_t.len(), "{name}: number of UNet calls");
        for (a, b) in seen.iter().zip(&expected_t) {
            assert!(
                (a - b).abs() < 1e-3,
                "{name}: timesteps {seen:?} vs {expected_t:?}"
            );
        }
        assert_close(
            &format!("scheduler {name}"),
            &images.pixels,
            &refs.get(&format!("pipe_{name}")),
            1e-3,
        );
    }
}

/// diffusers' `rescale_noise_cfg` in closed form, over seeded shapes and scales: at 1 each
/// item's standard deviation becomes the conditional prediction's, at 0 nothing changes, and
/// in between the result is the linear mix; out-of-range values are refused by name.
#[test]
fn guidance_rescale_matches_its_closed_form() {
    use stable_diffusion::pipeline::rescale_guidance;
    for (seed, shape) in [(1, [1, 4, 8, 8]), (2, [2, 4, 5, 7]), (3, [3, 9, 2, 3])] {
        tch::manual_seed(seed);
        let guided = common::locked_randn(&shape) * 3.0 + 0.5;
        let cond = common::locked_randn(&shape) * 0.7;
        let full = rescale_guidance(&guided, &cond, 1.0).unwrap();
        for b in 0..shape[0] {
            let (f, c, g) = (full.get(b), cond.get(b), guided.get(b));
            let rel =
                (f.std(true) - c.std(true)).abs().double_value(&[]) / c.std(true).double_value(&[]);
            assert!(rel < 1e-5, "item {b}: std {rel}");
            // The direction is the guided prediction's: a positive multiple of it.
            let ratio = f.divide(&g);
            let spread = (ratio.max() - ratio.min()).double_value(&[]);
            assert!(spread < 1e-4, "item {b}: not a multiple ({spread})");
        }
        let none = rescale_guidance(&guided, &cond, 0.0).unwrap();
        assert!(common::max_abs_diff(&none, &guided) < 1e-6);
        let half = rescale_guidance(&guided, &cond, 0.3).unwrap();
        let mix = &full * 0.3 + &guided * 0.7;
        assert!(common::max_abs_diff(&half, &mix) < 1e-5);
    }
    let sd = common::load_model("tiny-sd1");
    for bad in [-0.1, 1.5, f64::NAN] {
        let r = sd.txt2img(
            &GenerateParams {
                prompt: "x".into(),
                steps: 1,
                guidance_rescale: bad,
                ..Default::default()
            },
            None,
        );
        assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("guidance_rescale")));
    }
}

/// An image is a function of the model, its load options and the call's own arguments, never
/// of the calls the pipeline ran before: layers pack their weights at first use and choose the
/// packed or the plain kernels by the size of their input, so a call at one size must not leave
/// a later call at another size on other kernels (which round differently). Checked for mapped
/// and copied weights, on sizes that put the deep layers on either side of that choice.
#[test]
fn an_image_does_not_depend_on_the_calls_before_it() {
    let render = |sd: &StableDiffusion, side: i64| {
        sd.generate(
            &GenerateParams {
                prompt: "a red circle".into(),
                steps: 2,
                guidance: 5.0,
                seed: 4,
                width: Some(side),
                height: Some(side),
                ..Default::default()
            },
            None,
        )
        .unwrap()
        .pixels
    };
    for copy_weights in [false, true] {
        let options = LoadOptions {
            copy_weights,
            ..Default::default()
        };
        let fresh = |side| {
            let sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &options).unwrap();
            render(&sd, side)
        };
        // tiny-sd1's deepest convolutions pack up to 256x256 and its first level's up to
        // 96x96; 64 and 96 pack them for different input sizes.
        let sides = [96i64, 64, 128, 256, 288, 64];
        let sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &options).unwrap();
        for side in sides {
            let after = render(&sd, side);
            let alone = fresh(side);
            let d = common::max_abs_diff(&after, &alone);
            assert_eq!(d, 0.0, "copy_weights {copy_weights}, {side}x{side}: {d}");
        }
    }
}
