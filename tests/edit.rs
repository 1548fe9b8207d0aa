//! img2img and inpainting (4- and 9-channel UNets) against diffusers 0.42.1's
//! StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline on the tiny fixtures
//! (tests/fixtures/edit-cases.json, made by tools/fixtures/models.py), plus the behaviour that
//! has no diffusers counterpart: paste-back, strength 0, argument errors and resizing.
mod common;

use common::{cases, fixtures, image_of, max_abs_diff, Refs};
use stable_diffusion::image_io::Image;
use stable_diffusion::pipeline::{Control, GenerateParams, LoadOptions, StableDiffusion, StepInfo};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-3;

fn load(model: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(model), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// A deterministic picture (not one of the fixtures' images): a gradient with a dark bar.
fn synthetic(width: u32, height: u32) -> Image {
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let bar = (width / 3..width / 2).contains(&x);
            let r = (20 + 200 * x / width.max(1)) as u8;
            let g = (40 + 180 * y / height.max(1)) as u8;
            let b = if bar { 10 } else { 160 };
            rgb.extend_from_slice(&[r, g, b]);
        }
    }
    Image::new(width, height, rgb).unwrap()
}

/// White (repaint) inside `x0..x1, y0..y1`, black elsewhere.
fn rect_mask(width: u32, height: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> Image {
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    for y in y0..y1 {
        for x in x0..x1 {
            let i = ((y * width + x) * 3) as usize;
            rgb[i..i + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
    Image::new(width, height, rgb).unwrap()
}

fn params_of(case: &serde_json::Value, refs: &Refs) -> GenerateParams {
    let image = image_of(&refs.get(&format!("image_{}", case["image"].as_str().unwrap())));
    let mask = case["mask"]
        .as_str()
        .map(|m| image_of(&refs.get(&format!("mask_{m}"))));
    GenerateParams {
        init_image: Some(image),
        mask,
        strength: case["strength"].as_f64(),
        paste_back: false,
        ..common::case_params(case)
    }
}

/// Runs every case of `group` in edit-cases.json; returns one line per failure.
fn run_edit_cases(group: &str) -> Vec<String> {
    let doc = cases("edit");
    let refs = Refs::open("edit");
    let mut models: BTreeMap<String, StableDiffusion> = BTreeMap::new();
    let mut failures = Vec::new();
    let list: Vec<&serde_json::Value> = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["group"] == group)
        .collect();
    assert!(
        list.len() >= 10,
        "edit-cases.json has {} {group} cases",
        list.len()
    );
    for case in list {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let sd = models
            .entry(model.to_string())
            .or_insert_with(|| load(model));
        let params = params_of(case, &refs);
        assert_eq!(
            params.mask.is_some(),
            case["pipeline"] == "inpaint",
            "{name}: pipeline kind"
        );
        let mut seen = Vec::new();
        let mut on_step = |info: &StepInfo| {
            seen.push(info.timestep);
            Control::Continue
        };
        let images = match sd.generate(&params, Some(&mut on_step)) {
            Ok(images) => images,
            Err(e) => {
                failures.push(format!("{name}: generate failed: {e}"));
                continue;
            }
        };
        let expected_t: Vec<f64> = common::f64s(&case["timesteps"]);
        if seen != expected_t {
            failures.push(format!(
                "{name}: timesteps {seen:?}, diffusers ran {expected_t:?}"
            ));
        }
        let expected = refs.get(&format!("out_{name}"));
        if images.pixels.size() != expected.size() {
            failures.push(format!(
                "{name}: shape {:?}, expected {:?}",
                images.pixels.size(),
                expected.size()
            ));
            continue;
        }
        let err = max_abs_diff(&images.pixels, &expected);
        eprintln!("{name} ({model}): max abs error {err:.3e}");
        if err.is_nan() || err > TOLERANCE {
            failures.push(format!("{name}: max abs error {err:e} > {TOLERANCE:e}"));
        }
    }
    failures
}

/// img2img and inpainting with DDIM (eta 0 and > 0) and DDPM (step noise).
#[test]
fn edit_cases_match_diffusers() {
    let failures = run_edit_cases("ddim_ddpm");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The editing paths with the sigma and multistep schedulers, chosen by their A1111 names:
/// begin index, add_noise on a sigma schedule, init_noise_sigma, Heun's second order, PLMS
/// without a begin index, ancestral / SDE / LCM step noise.
#[test]
fn edit_cases_with_other_schedulers_match_diffusers() {
    let failures = run_edit_cases("other_schedulers");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The pixel indices a mask keeps / repaints: grey as PIL's `convert("L")` (ITU-R 601-2 luma
/// in 16-bit fixed point), repaint where grey / 255 >= 0.5, i.e. grey >= 128.
fn split_by_mask(mask: &Image) -> (Vec<usize>, Vec<usize>) {
    let (mut keep, mut repaint) = (Vec::new(), Vec::new());
    for (i, p) in mask.rgb.chunks_exact(3).enumerate() {
        let (r, g, b) = (p[0] as u32, p[1] as u32, p[2] as u32);
        let grey = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
        if grey >= 128 {
            repaint.push(i);
        } else {
            keep.push(i);
        }
    }
    (keep, repaint)
}

#[test]
fn paste_back_keeps_the_unmasked_pixels() {
    // A black-and-white mask, and one with colours and greys near the threshold.
    let coloured = image_of(&Refs::open("edit").get("mask_coloured_40x32"));
    let masks = [rect_mask(40, 32, 10, 6, 30, 22), coloured];
    let init = synthetic(40, 32);
    for (model, mask, strength) in [
        ("tiny-sd1", &masks[0], 1.0),
        ("tiny-sd1", &masks[1], 0.6),
        ("tiny-sd1-inpaint", &masks[0], 0.6),
        ("tiny-sd1-inpaint", &masks[1], 1.0),
    ] {
        let sd = load(model);
        let (keep, repaint) = split_by_mask(mask);
        assert!(!keep.is_empty() && !repaint.is_empty());
        let p = GenerateParams {
            prompt: "a purple butterfly".into(),
            steps: 4,
            guidance: 5.0,
            seed: 9,
            batch: 2,
            init_image: Some(init.clone()),
            mask: Some(mask.clone()),
            strength: Some(strength),
            paste_back: true,
            ..Default::default()
        };
        let images = sd.generate(&p, None).unwrap();
        assert_eq!((images.width(), images.height()), (40, 32));
        let plain = sd
            .generate(
                &GenerateParams {
                    paste_back: false,
                    ..p.clone()
                },
                None,
            )
            .unwrap();
        for (b, rgb) in images.to_rgb8().unwrap().iter().enumerate() {
            let what = format!("{model} strength {strength} image {b}");
            for &i in &keep {
                for c in 0..3 {
                    let (got, want) = (rgb[3 * i + c], init.rgb[3 * i + c]);
                    assert!(
                        got.abs_diff(want) <= 1,
                        "{what}: pixel {i} channel {c} is {got}, original {want}"
                    );
                }
            }
            let changed = repaint
                .iter()
                .filter(|&&i| (0..3).any(|c| rgb[3 * i + c].abs_diff(init.rgb[3 * i + c]) > 1))
                .count();
            assert!(
                changed * 2 > repaint.len(),
                "{what}: only {changed} of {} masked pixels changed",
                repaint.len()
            );
        }
        // Inside the mask, paste-back leaves the generated pixels alone.
        let pasted = images.pixels.reshape([2, -1, 3]);
        let generated = plain.pixels.reshape([2, -1, 3]);
        let idx = Tensor::from_slice(&repaint.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let err = max_abs_diff(
            &pasted.index_select(1, &idx),
            &generated.index_select(1, &idx),
        );
        assert!(
            err == 0.0,
            "{model}: paste-back changed masked pixels by {err}"
        );
    }
}

/// The VAE's round trip through its posterior mean, computed here without the pipeline.
fn decoded_posterior_mean(sd: &StableDiffusion, img: &Image) -> Tensor {
    let _guard = tch::no_grad_guard();
    let x = Tensor::from_slice(&img.rgb)
        .view([img.height as i64, img.width as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0
        * 2.0
        - 1.0;
    let mean = sd.vae.encode(&x).unwrap().mean;
    let decoded = sd.vae.decode(&mean).unwrap();
    (decoded / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1])
}

#[test]
fn strength_zero_returns_the_decoded_posterior_mean() {
    let sd = load("tiny-sd1");
    let init = synthetic(32, 40);
    let expected = decoded_posterior_mean(&sd, &init);
    let base = GenerateParams {
        prompt: "ignored".into(),
        steps: 5,
        seed: 4,
        batch: 2,
        init_image: Some(init.clone()),
        strength: Some(0.0),
        ..Default::default()
    };
    let mut calls = 0;
    let mut on_step = |_: &StepInfo| {
        calls += 1;
        Control::Continue
    };
    let img2img = sd.generate(&base, Some(&mut on_step)).unwrap();
    assert_eq!(calls, 0, "strength 0 runs no denoising step");
    assert_eq!(img2img.pixels.size(), vec![2, 40, 32, 3]);
    for b in 0..2 {
        let err = max_abs_diff(&img2img.pixels.get(b).unsqueeze(0), &expected);
        eprintln!("img2img strength 0, image {b}: max abs error {err:.3e}");
        assert!(err <= 1e-5, "img2img strength 0, image {b}: {err:e}");
    }
    // A strength too small to keep one step behaves the same.
    let tiny = sd
        .generate(
            &GenerateParams {
                strength: Some(0.1),
                ..base.clone()
            },
            None,
        )
        .unwrap();
    assert!(max_abs_diff(&tiny.pixels, &img2img.pixels) == 0.0);
    // Inpainting at strength 0 keeps the image too (the mask is irrelevant).
    let inpaint = sd
        .generate(
            &GenerateParams {
                mask: Some(rect_mask(32, 40, 4, 4, 20, 30)),
                ..base.clone()
            },
            None,
        )
        .unwrap();
    assert!(max_abs_diff(&inpaint.pixels, &img2img.pixels) == 0.0);
}

#[test]
fn bad_editing_arguments_are_clear_errors() {
    let sd = load("tiny-sd1");
    let init = synthetic(32, 32);
    let mask = rect_mask(32, 32, 8, 8, 24, 24);
    let base = GenerateParams {
        prompt: "x".into(),
        steps: 2,
        width: Some(32),
        height: Some(32),
        init_image: Some(init.clone()),
        ..Default::default()
    };
    let err_of = |sd: &StableDiffusion, p: &GenerateParams| -> String {
        match sd.generate(p, None) {
            Ok(_) => panic!("expected an error for {p:?}"),
            Err(e) => e.to_string(),
        }
    };
    let e = err_of(
        &sd,
        &GenerateParams {
            init_image: None,
            mask: Some(mask.clone()),
            ..base.clone()
        },
    );
    assert!(e.contains("mask") && e.contains("init image"), "{e}");
    for s in [1.5, -0.1, f64::NAN] {
        let e = err_of(
            &sd,
            &GenerateParams {
                strength: Some(s),
                ..base.clone()
            },
        );
        assert!(e.contains("strength") && e.contains("[0, 1]"), "{e}");
    }
    let inpaint = load("tiny-sd1-inpaint");
    for init_image in [None, Some(init.clone())] {
        let e = err_of(
            &inpaint,
            &GenerateParams {
                init_image,
                mask: None,
                ..base.clone()
            },
        );
        assert!(
            e.contains("inpainting model") && e.contains("9-channel") && e.contains("mask"),
            "{e}"
        );
    }
}

#[test]
fn init_images_of_another_size_are_resized() {
    let sd = load("tiny-sd1");
    let base = GenerateParams {
        prompt: "a house".into(),
        steps: 2,
        strength: Some(0.5),
        ..Default::default()
    };
    // Explicit size: the init image (and the mask) are resized to it.
    for mask in [None, Some(rect_mask(64, 64, 16, 16, 48, 48))] {
        let p = GenerateParams {
            width: Some(32),
            height: Some(40),
            init_image: Some(synthetic(48, 56)),
            mask,
            ..base.clone()
        };
        let images = sd.generate(&p, None).unwrap();
        assert_eq!(images.pixels.size(), vec![1, 40, 32, 3]);
    }
    // No size given: the init image's, rounded down to a multiple of 8.
    let p = GenerateParams {
        init_image: Some(synthetic(45, 37)),
        ..base.clone()
    };
    let images = sd.generate(&p, None).unwrap();
    assert_eq!((images.width(), images.height()), (40, 32));
}
