//! The opt-in fast modes: off, they change nothing; step caching's shallow pass is exactly the
//! full pass when it reuses features of the same input, and never runs the deep layers; token
//! merging leaves the output's shape and keeps it close; bad settings are refused by name.
mod common;

use common::{err_text, fixtures, locked_randn, max_abs_diff, Pick, Rng};
use stable_diffusion::models::{
    DeepCache, FastPass, TokenMerging, UNet2DConditionModel, UNetConfig,
};
use stable_diffusion::pipeline::{FastModes, GenerateParams, LoadOptions, StableDiffusion};
use tch::nn::VarStore;
use tch::Tensor;

/// A random UNet, its config and its (single) cross-attention width.
fn random_model(rng: &mut Rng) -> (VarStore, UNet2DConditionModel, UNetConfig, i64) {
    let json = common::random_unet(rng);
    let cross_dim = json["cross_attention_dim"].as_i64().unwrap();
    let config: UNetConfig = serde_json::from_value(json).unwrap();
    let vs = VarStore::new(tch::Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    (vs, unet, config, cross_dim)
}

/// One UNet call with step caching: a full pass that fills `cache`, or one that reuses it.
fn cached_pass(
    unet: &UNet2DConditionModel,
    (sample, t, context): (&Tensor, f64, &Tensor),
    cache: &mut DeepCache,
    reuse: bool,
) -> stable_diffusion::Result<Tensor> {
    unet.forward_fast(
        sample,
        t,
        context,
        None,
        &mut FastPass {
            cache: Some((cache, reuse)),
            ..Default::default()
        },
    )
}

/// For random UNet layouts, sizes (odd sides included) and every branch: a full pass that
/// stores the features returns the exact output, a shallow pass on the same input returns it
/// again, and the shallow pass still works when the deep layers are poisoned with NaN (so it
/// really skips them).
#[test]
fn a_shallow_pass_on_the_same_input_is_the_full_pass() {
    let _g = tch::no_grad_guard();
    let mut rng = Rng::new(11);
    for case in 0..16 {
        let (vs, unet, config, cross_dim) = random_model(&mut rng);
        let side = *rng.pick(&[8i64, 7, 6, 5]);
        let batch = 1 + rng.below(2) as i64;
        let sample = locked_randn(&[batch, config.in_channels, side, side]);
        let context = locked_randn(&[batch, 3, cross_dim]);
        let t = 10.0 + rng.below(900) as f64;
        let exact = unet.forward(&sample, t, &context).unwrap();
        let skips = unet.skip_connections();
        let mut shallow = Vec::new();
        for branch in 0..skips {
            let mut cache = DeepCache::new(branch);
            let full = cached_pass(&unet, (&sample, t, &context), &mut cache, false).unwrap();
            assert_eq!(
                max_abs_diff(&full, &exact),
                0.0,
                "case {case} branch {branch}"
            );
            shallow.push(cache);
        }
        for p in vs
            .variables()
            .iter()
            .filter(|(k, _)| k.starts_with("mid_block."))
        {
            let mut t = p.1.shallow_clone();
            let _ = t.fill_(f64::NAN);
        }
        assert!(bool::try_from(unet.forward(&sample, t, &context).unwrap().isnan().any()).unwrap());
        for (branch, mut cache) in shallow.into_iter().enumerate() {
            let again = cached_pass(&unet, (&sample, t, &context), &mut cache, true).unwrap();
            let d = max_abs_diff(&again, &exact);
            assert!(d <= 1e-6, "case {case} branch {branch}/{skips}: {d}");
        }
        // A branch past the skips is refused by name.
        let mut cache = DeepCache::new(skips);
        let err = err_text(cached_pass(
            &unet,
            (&sample, t, &context),
            &mut cache,
            false,
        ));
        assert!(err.contains("branch"), "{err}");
    }
}

/// Token merging at ratio 0 is the exact pass; above it the output keeps its shape, stays
/// finite and close, whichever level is the finest with attention.
#[test]
fn token_merging_keeps_the_output_close() {
    let _g = tch::no_grad_guard();
    let mut rng = Rng::new(5);
    for case in 0..10 {
        // Seeded under the generator lock: the weights and inputs are the same whatever other
        // tests drew before, so the bound below is checked on the same ten models every run.
        let _rng = stable_diffusion::rng::GLOBAL_RNG.lock();
        tch::manual_seed(100 + case);
        let (_vs, unet, config, cross_dim) = random_model(&mut rng);
        let sample = locked_randn(&[2, config.in_channels, 8, 8]);
        let context = locked_randn(&[2, 3, cross_dim]);
        let exact = unet.forward(&sample, 500.0, &context).unwrap();
        let run = |ratio: f64| {
            unet.forward_fast(
                &sample,
                500.0,
                &context,
                None,
                &mut FastPass {
                    token_merging: Some(TokenMerging { ratio, seed: 3 }),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        assert_eq!(max_abs_diff(&run(0.0), &exact), 0.0, "case {case}");
        let half = run(0.5);
        assert_eq!(half.size(), exact.size());
        assert!(bool::try_from(half.isfinite().all()).unwrap());
        let d = max_abs_diff(&half, &exact);
        assert!(d > 0.0, "case {case}: merging changed nothing");
        let scale = f64::try_from(exact.abs().max()).unwrap();
        assert!(d < scale, "case {case}: {d} against outputs up to {scale}");
    }
}

fn tiny() -> StableDiffusion {
    StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap()
}

fn render(sd: &StableDiffusion, fast: FastModes) -> Tensor {
    let images = sd
        .generate(
            &GenerateParams {
                prompt: "a red circle".into(),
                steps: 6,
                guidance: 5.0,
                seed: 9,
                width: Some(64),
                height: Some(64),
                fast,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    images.pixels
}

/// Off is exactly off, whatever the branch; each mode on changes the image a little.
#[test]
fn fast_modes_off_change_nothing_and_on_stay_close() {
    let sd = tiny();
    let exact = render(&sd, FastModes::default());
    for off in [
        FastModes {
            cache_interval: 1,
            cache_branch: 5,
            ..Default::default()
        },
        FastModes {
            cache_interval: 0,
            cache_branch: 1000,
            token_merging: 0.0,
            int8_linear: false,
        },
    ] {
        assert_eq!(max_abs_diff(&render(&sd, off), &exact), 0.0, "{off:?}");
    }
    for on in [
        FastModes {
            cache_interval: 2,
            ..Default::default()
        },
        FastModes {
            cache_interval: 3,
            cache_branch: 2,
            ..Default::default()
        },
        FastModes {
            token_merging: 0.5,
            ..Default::default()
        },
        FastModes {
            int8_linear: true,
            ..Default::default()
        },
        FastModes {
            cache_interval: 2,
            token_merging: 0.5,
            int8_linear: true,
            ..Default::default()
        },
    ] {
        let got = render(&sd, on);
        let d = max_abs_diff(&got, &exact);
        assert!(d > 0.0, "{on:?} changed nothing");
        assert!(bool::try_from(got.isfinite().all()).unwrap(), "{on:?}");
        // Pixels are in [0, 1]: a difference of 1 would be a mode that diverged.
        assert!(d < 1.0, "{on:?}: {d}");
    }
}

#[test]
fn bad_fast_settings_are_refused_by_name() {
    let sd = tiny();
    let skips = sd.unet.skip_connections().unwrap();
    let cases = [
        (
            FastModes {
                token_merging: 0.8,
                ..Default::default()
            },
            "token merging ratio",
        ),
        (
            FastModes {
                token_merging: f64::NAN,
                ..Default::default()
            },
            "token merging ratio",
        ),
        (
            FastModes {
                token_merging: -0.1,
                ..Default::default()
            },
            "token merging ratio",
        ),
        (
            FastModes {
                cache_interval: 2,
                cache_branch: skips,
                ..Default::default()
            },
            "step cache branch",
        ),
        (
            FastModes {
                cache_interval: 100_000,
                ..Default::default()
            },
            "step cache interval",
        ),
    ];
    for (fast, needle) in cases {
        let err = err_text(sd.validate(&GenerateParams {
            prompt: "x".into(),
            fast,
            ..Default::default()
        }));
        assert!(err.contains(needle), "{fast:?}: {err}");
    }
    // int8 linear layers need a float32 pipeline on the CPU.
    let bf16 = StableDiffusion::load(
        &fixtures().join("tiny-sd1"),
        &LoadOptions {
            kind: tch::Kind::BFloat16,
            ..Default::default()
        },
    )
    .unwrap();
    let int8 = GenerateParams {
        prompt: "x".into(),
        fast: FastModes {
            int8_linear: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = err_text(bf16.validate(&int8));
    assert!(
        err.contains("int8 linear layers need a float32 pipeline"),
        "{err}"
    );
    sd.validate(&int8).unwrap();
}
