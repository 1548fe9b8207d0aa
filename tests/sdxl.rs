//! SDXL against diffusers' StableDiffusionXLPipeline on the tiny random-initialised SDXL
//! folder that tools/fixtures/sdxl.py saves with its reference outputs: both text encoders
//! (penultimate states, pooled projection), the `text_time` UNet, and whole txt2img runs with
//! the second prompts, zeroed negatives and micro-conditioning.
mod common;

use common::{assert_close, cases, err_text, fixtures, Refs};
use stable_diffusion::models::AddedConditions;
use stable_diffusion::pipeline::{
    Control, GenerateParams, Images, LoadOptions, MicroConditioning, StableDiffusion, StepInfo,
};
use stable_diffusion::Error;

const MODEL: &str = "tiny-sdxl";
const TOL: f64 = 1e-4;

fn load() -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(MODEL), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{MODEL}: {e}"))
}

fn second(
    sd: &StableDiffusion,
) -> &(
    stable_diffusion::tokenizer::ClipTokenizer,
    Box<dyn stable_diffusion::models::TextEncoder>,
) {
    let sdxl = sd.sdxl.as_ref().expect("an SDXL model");
    sdxl.second.as_ref().expect("a second text encoder")
}

#[test]
fn both_tokenizers_match_transformers() {
    let sd = load();
    let refs = Refs::open(MODEL);
    let prompts = cases(MODEL)["text_prompts"].as_array().unwrap().clone();
    let (tokenizer_2, _) = second(&sd);
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().unwrap();
        let want: Vec<i64> = Vec::try_from(refs.get("text_ids").get(i as i64)).unwrap();
        assert_eq!(sd.tokenizer.encode_padded(p), want, "tokenizer, prompt {i}");
        let want: Vec<i64> = Vec::try_from(refs.get("text_ids_2").get(i as i64)).unwrap();
        assert_eq!(
            tokenizer_2.encode_padded(p),
            want,
            "tokenizer_2, prompt {i}"
        );
    }
}

#[test]
fn text_encoders_give_diffusers_penultimate_states_and_pooled_projection() {
    let _g = tch::no_grad_guard();
    let sd = load();
    let refs = Refs::open(MODEL);
    let (_, encoder_2) = second(&sd);
    for (skip, suffix) in [(0, "penultimate"), (1, "skip1")] {
        let first = sd
            .text_encoder
            .forward_penultimate(&refs.get("text_ids"), skip, false)
            .unwrap();
        assert!(first.pooled.is_none());
        assert_close(
            &format!("te1_{suffix}"),
            &first.hidden,
            &refs.get(&format!("te1_{suffix}")),
            TOL,
        );
        let second = encoder_2
            .forward_penultimate(&refs.get("text_ids_2"), skip, true)
            .unwrap();
        assert_close(
            &format!("te2_{suffix}"),
            &second.hidden,
            &refs.get(&format!("te2_{suffix}")),
            TOL,
        );
        // The pooled output comes from the last layer whatever clip_skip is.
        assert_close(
            "te2_pooled",
            &second.pooled.unwrap(),
            &refs.get("te2_pooled"),
            TOL,
        );
    }
    // The final-normed last layer is what the plain forward gives.
    let last = encoder_2.forward(&refs.get("text_ids_2"), 0).unwrap();
    assert_close("te2_last", &last, &refs.get("te2_last"), TOL);
    let layers = encoder_2.num_layers().unwrap();
    let err = encoder_2
        .forward_penultimate(&refs.get("text_ids_2"), layers, true)
        .unwrap_err();
    assert!(err.to_string().contains("clip_skip"), "{err}");
}

fn added(refs: &Refs, prefix: &str) -> AddedConditions {
    AddedConditions {
        text_embeds: refs.get(&format!("{prefix}_text_embeds")),
        time_ids: refs.get(&format!("{prefix}_time_ids")),
    }
}

#[test]
fn text_time_unet_matches_diffusers() {
    let _g = tch::no_grad_guard();
    let sd = load();
    check_added_unet(&sd, MODEL, "unet");
}

/// The UNet on a fixture's `{prefix}_*` and `{prefix}_odd_*` inputs (sample, timestep from
/// the cases file, text states, added conditions) against diffusers' outputs.
fn check_added_unet(sd: &StableDiffusion, model: &str, prefix: &str) {
    let refs = Refs::open(model);
    let all = cases(model);
    for (prefix, t) in [
        (prefix.to_string(), "unet_timestep"),
        (format!("{prefix}_odd"), "unet_odd_timestep"),
    ] {
        let out = sd
            .unet
            .forward_fast(
                &refs.get(&format!("{prefix}_sample")),
                all[t].as_f64().unwrap(),
                &refs.get(&format!("{prefix}_ehs")),
                Some(&added(&refs, &prefix)),
                &mut Default::default(),
            )
            .unwrap();
        assert_close(&prefix, &out, &refs.get(&format!("{prefix}_out")), TOL);
    }
}

#[test]
fn text_time_unet_names_missing_or_misshapen_conditions() {
    let _g = tch::no_grad_guard();
    let sd = load();
    let refs = Refs::open(MODEL);
    let (sample, ehs) = (refs.get("unet_sample"), refs.get("unet_ehs"));
    let err = err_text(sd.unet.forward(&sample, 10.0, &ehs));
    assert!(err.contains("added conditions"), "{err}");
    let good = added(&refs, "unet");
    let bad = [
        AddedConditions {
            text_embeds: good.text_embeds.narrow(1, 0, 5),
            time_ids: good.time_ids.shallow_clone(),
        },
        AddedConditions {
            text_embeds: good.text_embeds.shallow_clone(),
            time_ids: good.time_ids.narrow(0, 0, 1),
        },
        AddedConditions {
            text_embeds: good.text_embeds.unsqueeze(0),
            time_ids: good.time_ids.shallow_clone(),
        },
    ];
    for (i, b) in bad.iter().enumerate() {
        let r = sd
            .unet
            .forward_fast(&sample, 10.0, &ehs, Some(b), &mut Default::default());
        let err = err_text(r);
        assert!(
            err.contains("text_embeds")
                || err.contains("time_ids")
                || err.contains("add_embedding"),
            "case {i}: {err}"
        );
    }
    // An SD 1.x UNet refuses them.
    let sd1 = StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let s1 = Refs::open("tiny-sd1");
    let r = sd1.unet.forward_fast(
        &s1.get("unet_sample"),
        10.0,
        &s1.get("unet_ehs"),
        Some(&good),
        &mut Default::default(),
    );
    assert!(err_text(r).contains("no added conditions"));
}

#[test]
fn vae_with_sdxl_scaling_matches_diffusers() {
    let _g = tch::no_grad_guard();
    let sd = load();
    let refs = Refs::open(MODEL);
    assert_eq!(sd.vae.scaling_factor(), 0.13025);
    let decoded = sd.vae.decode(&refs.get("vae_latents")).unwrap();
    assert_close("vae_decoded", &decoded, &refs.get("vae_decoded"), TOL);
}

fn pair(v: &serde_json::Value) -> Option<(i64, i64)> {
    let a = v.as_array()?;
    Some((a.first()?.as_i64()?, a.get(1)?.as_i64()?))
}

fn params_of(case: &serde_json::Value) -> GenerateParams {
    let text = |k: &str| case[k].as_str().map(String::from);
    GenerateParams {
        prompt_2: text("prompt_2"),
        negative_prompt_2: text("negative_prompt_2"),
        guidance_rescale: case["guidance_rescale"].as_f64().unwrap_or(0.0),
        micro: MicroConditioning {
            original_size: pair(&case["original_size"]),
            crops_coords_top_left: pair(&case["crops_coords_top_left"]).unwrap_or((0, 0)),
            target_size: pair(&case["target_size"]),
            negative_original_size: pair(&case["negative_original_size"]),
            negative_crops_coords_top_left: pair(&case["negative_crops_coords_top_left"])
                .unwrap_or((0, 0)),
            negative_target_size: pair(&case["negative_target_size"]),
            ..Default::default()
        },
        ..common::case_params(case)
    }
}

#[test]
fn txt2img_matches_diffusers_sdxl_pipeline() {
    let sd = load();
    let flags = sd.sdxl.as_ref().unwrap();
    assert!(flags.force_zeros_for_empty_prompt && !flags.requires_aesthetics_score);
    let refs = Refs::open(MODEL);
    let all = cases(MODEL);
    let list = all["cases"].as_array().unwrap();
    assert!(list.len() >= 6, "expected the fixture's SDXL cases");
    for case in list {
        let name = case["name"].as_str().unwrap();
        let params = params_of(case);
        // A case may change the scheduler config's DDIM flags (diffusers' `from_config`
        // overrides).
        let mut with_overrides = None;
        if let Some(o) = case["scheduler_overrides"]
            .as_object()
            .filter(|o| !o.is_empty())
        {
            let mut other = load();
            let flag = |k: &str| o.get(k).and_then(|v| v.as_bool());
            if let Some(v) = flag("clip_sample") {
                other.scheduler_config.clip_sample = Some(v);
            }
            if let Some(v) = flag("set_alpha_to_one") {
                other.scheduler_config.set_alpha_to_one = Some(v);
            }
            with_overrides = Some(other);
        }
        let sd = with_overrides.as_ref().unwrap_or(&sd);
        common::check_txt2img_case(name, sd, &params, case, &refs);
    }
}

/// The zeroed negative differs from the encoded empty prompt, so the choice is observable:
/// the same request with `negative_prompt: Some("")` must give another image than `None`.
#[test]
fn absent_and_empty_negative_prompts_differ_as_in_diffusers() {
    let sd = load();
    let base = GenerateParams {
        prompt: "a red circle".into(),
        steps: 2,
        guidance: 5.0,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let absent = sd.txt2img(&base, None).unwrap().pixels;
    let empty = sd
        .txt2img(
            &GenerateParams {
                negative_prompt: Some(String::new()),
                ..base.clone()
            },
            None,
        )
        .unwrap()
        .pixels;
    let diff = (&absent - &empty).abs().max().double_value(&[]);
    assert!(
        diff > 1e-4,
        "zeroed and encoded negatives gave the same image"
    );
}

#[test]
fn micro_conditioning_out_of_range_is_named() {
    let sd = load();
    for (name, micro) in [
        (
            "original_size",
            MicroConditioning {
                original_size: Some((-1, 32)),
                ..Default::default()
            },
        ),
        (
            "negative_target_size",
            MicroConditioning {
                negative_target_size: Some((32, i64::MAX)),
                ..Default::default()
            },
        ),
    ] {
        let r = sd.txt2img(
            &GenerateParams {
                prompt: "x".into(),
                steps: 1,
                micro,
                ..Default::default()
            },
            None,
        );
        match r {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(name), "{msg}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
}

#[test]
fn folder_checks_name_what_does_not_fit() {
    let root = std::env::temp_dir().join(format!("sd-sdxl-checks-{}", std::process::id()));
    let base = fixtures().join(MODEL);
    // A second encoder without projection cannot give the pooled embedding.
    let dir = root.join("no-projection");
    common::copy_dir(&base, &dir);
    let cfg_path = dir.join("text_encoder_2/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["CLIPTextModel"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
    assert!(err.contains("CLIPTextModelWithProjection"), "{err}");
    // No tokenizer_2/.
    let dir = root.join("no-tokenizer-2");
    common::copy_dir(&base, &dir);
    std::fs::remove_dir_all(dir.join("tokenizer_2")).unwrap();
    let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
    assert!(err.contains("tokenizer_2"), "{err}");
    // No text_encoder_2/: the UNet's added conditions have no source.
    let dir = root.join("no-encoder-2");
    common::copy_dir(&base, &dir);
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
    assert!(
        err.contains("text_encoder_2") || err.contains("cross_attention_dim"),
        "{err}"
    );
    // add_embedding sized for another number of time ids.
    let dir = root.join("wrong-time-ids");
    common::copy_dir(&base, &dir);
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let time = cfg["addition_time_embed_dim"].as_i64().unwrap();
    let input = cfg["projection_class_embeddings_input_dim"]
        .as_i64()
        .unwrap();
    cfg["projection_class_embeddings_input_dim"] = serde_json::json!(input - time);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
    assert!(
        err.contains("add_embedding") || err.contains("time ids"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

const REFINER: &str = "tiny-sdxl-refiner";

fn load_refiner() -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(REFINER), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{REFINER}: {e}"))
}

/// The refiner's folder: one text encoder (with projection), five time ids ending in the
/// aesthetic score, `force_zeros_for_empty_prompt: false`.
#[test]
fn refiner_unet_with_aesthetic_time_ids_matches_diffusers() {
    let _g = tch::no_grad_guard();
    let sd = load_refiner();
    let flags = sd.sdxl.as_ref().expect("an SDXL model");
    assert!(flags.second.is_none() && flags.requires_aesthetics_score);
    assert!(!flags.force_zeros_for_empty_prompt);
    check_added_unet(&sd, REFINER, "refiner_unet");
}

/// img2img with the refiner against diffusers' StableDiffusionXLImg2ImgPipeline: default and
/// custom aesthetic scores, an encoded empty negative prompt, batch 2.
#[test]
fn refiner_img2img_matches_diffusers() {
    let sd = load_refiner();
    let refs = Refs::open(REFINER);
    for case in cases(REFINER)["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let image =
            common::image_of(&refs.get(&format!("image_{}", case["image"].as_str().unwrap())));
        let mut micro = MicroConditioning::default();
        if let Some(a) = case["aesthetic_score"].as_f64() {
            micro.aesthetic_score = a;
        }
        if let Some(a) = case["negative_aesthetic_score"].as_f64() {
            micro.negative_aesthetic_score = a;
        }
        let params = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().map(String::from),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            batch: case["batch"].as_u64().unwrap() as usize,
            strength: case["strength"].as_f64(),
            scheduler: case["scheduler"].as_str().map(String::from),
            init_image: Some(image),
            micro,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut on_step = |info: &stable_diffusion::pipeline::StepInfo| {
            seen.push(info.timestep);
            stable_diffusion::pipeline::Control::Continue
        };
        let images = sd
            .generate(&params, Some(&mut on_step))
            .unwrap_or_else(|e| panic!("refiner {name}: {e}"));
        assert_eq!(seen, common::f64s(&case["timesteps"]), "refiner {name}");
        assert_close(
            &format!("refiner {name}"),
            &images.pixels,
            &refs.get(&format!("out_{name}")),
            1e-3,
        );
    }
}

/// A refiner folder whose model_index.json says six time ids (or an SDXL base that says
/// five) does not fit its UNet: refused at load, naming the flag.
#[test]
fn aesthetic_flag_that_contradicts_the_unet_is_named() {
    let root = std::env::temp_dir().join(format!("sd-sdxl-flags-{}", std::process::id()));
    for (model, value) in [(REFINER, false), (MODEL, true)] {
        let dir = root.join(model);
        common::copy_dir(&fixtures().join(model), &dir);
        let index = dir.join("model_index.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        json["requires_aesthetics_score"] = serde_json::json!(value);
        std::fs::write(&index, json.to_string()).unwrap();
        let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
        assert!(err.contains("requires_aesthetics_score"), "{model}: {err}");
        json["requires_aesthetics_score"] = serde_json::json!("yes");
        std::fs::write(&index, json.to_string()).unwrap();
        let err = err_text(StableDiffusion::load(&dir, &LoadOptions::default()));
        assert!(err.contains("not a boolean"), "{model}: {err}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// img2img and inpainting with the base and the 9-channel model, base + refiner ensembles, and
// Turbo (tests/fixtures/tiny-sdxl-edit-cases.json)

const EDIT: &str = "tiny-sdxl-edit";

/// `model` loaded with a case's scheduler `from_config` overrides (DDIM's flags).
fn load_for(model: &str, case: &serde_json::Value) -> StableDiffusion {
    let mut sd = StableDiffusion::load(&fixtures().join(model), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    if let Some(o) = case["scheduler_overrides"].as_object() {
        let flag = |k: &str| o.get(k).and_then(|v| v.as_bool());
        if let Some(v) = flag("clip_sample") {
            sd.scheduler_config.clip_sample = Some(v);
        }
        if let Some(v) = flag("set_alpha_to_one") {
            sd.scheduler_config.set_alpha_to_one = Some(v);
        }
    }
    sd
}

/// The request of an edit-file case: its images from the refs, the scheduler by name except
/// on the Turbo folder (its own).
fn edit_params(case: &serde_json::Value, refs: &Refs) -> GenerateParams {
    let mut params = params_of(case);
    let image = |k: &str| {
        case[k]
            .as_str()
            .map(|name| common::image_of(&refs.get(&format!("{k}_{name}"))))
    };
    params.init_image = image("image");
    params.mask = image("mask");
    params.strength = case["strength"].as_f64();
    if params.init_image.is_some() {
        // editing takes its size from the image
        params.width = None;
        params.height = None;
    }
    if case["model"] == "tiny-sdxl-turbo" {
        params.scheduler = None;
    }
    params
}

/// Runs `run` with a callback that records the timesteps, checks them and the images.
fn check_edit_case(
    case: &serde_json::Value,
    refs: &Refs,
    run: impl FnOnce(&mut dyn FnMut(&StepInfo) -> Control) -> stable_diffusion::Result<Images>,
) {
    let name = case["name"].as_str().unwrap();
    let mut seen = Vec::new();
    let mut steps = Vec::new();
    let mut on_step = |info: &StepInfo| {
        seen.push(info.timestep);
        steps.push((info.step, info.total));
        Control::Continue
    };
    let images = run(&mut on_step).unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = common::f64s(&case["timesteps"]);
    assert_eq!(seen, want, "{name}: timesteps");
    let n = want.len();
    assert_eq!(
        steps,
        (1..=n).map(|i| (i, n)).collect::<Vec<_>>(),
        "{name}: step numbers"
    );
    assert_close(
        name,
        &images.pixels,
        &refs.get(&format!("out_{name}")),
        1e-3,
    );
}

/// img2img and inpainting with the SDXL base (4-channel blend) and the 9-channel inpainting
/// model against StableDiffusionXL{Img2Img,Inpaint}Pipeline: SDXL's default strengths, the
/// editing pipelines' rule for negative time ids, Euler a, DDIM, strength 1, batch 2.
#[test]
fn img2img_and_inpainting_match_diffusers_sdxl_pipelines() {
    let refs = Refs::open(EDIT);
    let all = cases(EDIT);
    let list = all["edit"].as_array().unwrap();
    assert!(list.len() >= 6);
    for case in list {
        let sd = load_for(case["model"].as_str().unwrap(), case);
        let params = edit_params(case, &refs);
        check_edit_case(case, &refs, |cb| sd.generate(&params, Some(cb)));
    }
}

/// Base + refiner as an ensemble of experts (diffusers' `denoising_end` / `denoising_start`,
/// latents handed over without a decode), from text, from an image and inpainting, and with a
/// second-order scheduler (Heun: the hand-over's one-step adjustment).
#[test]
fn base_and_refiner_ensemble_matches_diffusers() {
    let refs = Refs::open(EDIT);
    let all = cases(EDIT);
    let list = all["ensemble"].as_array().unwrap();
    assert_eq!(list.len(), 4);
    for case in list {
        let base = load_for(MODEL, case);
        let refiner = load_for(REFINER, case);
        let params = edit_params(case, &refs);
        let start = case["refiner_start"].as_f64().unwrap();
        check_edit_case(case, &refs, |cb| {
            base.generate_with_refiner(&refiner, &params, start, Some(cb), &|| false)
        });
    }
}

/// Few-step runs as SDXL-Turbo is used: its own scheduler config (Euler a, trailing), one to
/// four steps, guidance 0 (a single UNet pass per step).
#[test]
fn turbo_steps_without_guidance_match_diffusers() {
    let refs = Refs::open(EDIT);
    let all = cases(EDIT);
    for case in all["turbo"].as_array().unwrap() {
        let sd = load_for("tiny-sdxl-turbo", case);
        assert_eq!(
            sd.scheduler_config.class_name.as_deref(),
            Some("EulerAncestralDiscreteScheduler")
        );
        let params = edit_params(case, &refs);
        assert!(params.guidance <= 1.0);
        check_edit_case(case, &refs, |cb| sd.generate(&params, Some(cb)));
    }
}

/// What the ensemble and the refiner refuse, with the argument named.
#[test]
fn refiner_misuse_is_named() {
    let base = load();
    let refiner = load_refiner();
    let params = GenerateParams {
        prompt: "a red circle".into(),
        steps: 4,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let err = err_text(refiner.generate(&params, None));
    assert!(
        err.contains("refiner") && err.contains("text alone"),
        "{err}"
    );
    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = err_text(base.generate_with_refiner(&refiner, &params, bad, None, &|| false));
        assert!(err.contains("refiner_start"), "{bad}: {err}");
    }
    // An inpainting UNet cannot continue another model's latents (refused as a text-to-image
    // request here, and by the ensemble itself when it gets a mask).
    let inpaint = StableDiffusion::load(
        &fixtures().join("tiny-sdxl-inpaint"),
        &LoadOptions::default(),
    )
    .unwrap();
    let err = err_text(base.generate_with_refiner(&inpaint, &params, 0.5, None, &|| false));
    assert!(err.contains("inpainting"), "{err}");
    let image = stable_diffusion::image_io::Image::new(32, 32, vec![128; 32 * 32 * 3]).unwrap();
    let masked = GenerateParams {
        init_image: Some(image.clone()),
        mask: Some(image),
        ..params.clone()
    };
    let err = err_text(base.generate_with_refiner(&inpaint, &masked, 0.5, None, &|| false));
    assert!(err.contains("inpainting UNet"), "{err}");
    // Cancelling in the refiner's phase stops the whole run.
    let mut calls = 0;
    let mut on_step = |info: &StepInfo| {
        calls += 1;
        if info.step > 3 {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let r = base.generate_with_refiner(&refiner, &params, 0.5, Some(&mut on_step), &|| false);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert_eq!(calls, 4);
}

/// `force_upcast`: a float16 SDXL pipeline holds its VAE in float32, as diffusers' SDXL
/// pipelines run it (SDXL's VAE overflows in float16): the VAE gives the float32 VAE's result
/// on the same inputs, and a whole float16 run stays close to diffusers' float32 image. An SD
/// 1.x VAE (diffusers' SD pipelines never upcast) and an SDXL VAE whose config says
/// `force_upcast: false` stay in float16.
#[test]
fn force_upcast_runs_the_sdxl_vae_in_float32() {
    let _g = tch::no_grad_guard();
    let half = LoadOptions {
        kind: tch::Kind::Half,
        ..Default::default()
    };
    let sd16 = StableDiffusion::load(&fixtures().join(MODEL), &half).unwrap();
    let sd32 = load();
    let refs = Refs::open(MODEL);
    let latents = refs.get("vae_latents").to_kind(tch::Kind::Half);
    let up = sd16.vae.decode(&latents).unwrap();
    assert_eq!(up.kind(), tch::Kind::Float);
    let want = sd32.vae.decode(&latents.to_kind(tch::Kind::Float)).unwrap();
    assert_close("upcast decode", &up, &want, 1e-6);
    let images = refs.get("vae_input");
    let dist = sd16.vae.encode(&images.to_kind(tch::Kind::Half)).unwrap();
    assert_eq!(dist.mean.kind(), tch::Kind::Half);
    let want = sd32
        .vae
        .encode(&images.to_kind(tch::Kind::Half).to_kind(tch::Kind::Float));
    assert_close(
        "upcast encode",
        &dist.mean.to_kind(tch::Kind::Float),
        &want.unwrap().mean,
        1e-3,
    );
    // A whole run in float16, against diffusers' float32 image.
    let all = cases(MODEL);
    let case = &all["cases"][0];
    let images = sd16.txt2img(&params_of(case), None).unwrap();
    assert_close("float16 case a", &images.pixels, &refs.get("pipe_a"), 2e-2);

    // The same from an SDXL single file (its configs from the folder).
    let overrides = stable_diffusion::weights::single_file::ModelOverrides {
        config_dir: Some(fixtures().join(MODEL)),
        ..Default::default()
    };
    let file = fixtures().join("single/tiny-sdxl.safetensors");
    let single = StableDiffusion::load_with(&file, &half, &overrides).unwrap();
    assert_eq!(
        single.vae.decode(&latents).unwrap().kind(),
        tch::Kind::Float
    );

    // Without the flag, and for SD 1.x, the VAE is float16.
    let dir = std::env::temp_dir().join(format!("sd-sdxl-upcast-{}", std::process::id()));
    common::copy_dir(&fixtures().join(MODEL), &dir);
    let config = dir.join("vae/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["force_upcast"] = serde_json::json!(false);
    std::fs::write(&config, json.to_string()).unwrap();
    let plain = StableDiffusion::load(&dir, &half).unwrap();
    assert_eq!(plain.vae.decode(&latents).unwrap().kind(), tch::Kind::Half);
    let _ = std::fs::remove_dir_all(&dir);
    let sd1 = StableDiffusion::load(&fixtures().join("tiny-sd1"), &half).unwrap();
    let z = tch::Tensor::zeros([1, 4, 8, 8], (tch::Kind::Half, tch::Device::Cpu));
    assert_eq!(sd1.vae.decode(&z).unwrap().kind(), tch::Kind::Half);
}
