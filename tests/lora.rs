//! LoRA: images against diffusers' `load_lora_weights` + `set_adapters` (fused and unfused),
//! per-call application that leaves no trace, prompt tags, and refusals
//! (`tools/fixtures/lora.py` writes the LoRA files and the references).
mod common;

use common::{assert_close, fixtures, max_abs_diff, Refs};
use stable_diffusion::lora::{Lora, LoraWeight};
use stable_diffusion::pipeline::{GenerateParams, PromptSyntax, StableDiffusion};
use stable_diffusion::Error;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn lora(file: &str) -> Arc<Lora> {
    Arc::new(Lora::load(&lora_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}")))
}

fn loras_of(case: &serde_json::Value) -> Vec<LoraWeight> {
    case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            LoraWeight::new(
                lora(l["file"].as_str().unwrap()),
                l["weight"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn run(sd: &StableDiffusion, params: &GenerateParams) -> tch::Tensor {
    sd.generate(params, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .pixels
}

fn bits_equal(a: &tch::Tensor, b: &tch::Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

/// Every case of `lora-cases.json`: our image with the case's LoRAs equals diffusers' (fused
/// and unfused) within 1e-3, and differs from the image without them as diffusers' does.
#[test]
fn lora_images_match_diffusers() {
    let cases = common::cases("lora");
    let refs = Refs::open("lora");
    let mut pipelines: HashMap<String, StableDiffusion> = HashMap::new();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let sd = pipelines
            .entry(model.to_string())
            .or_insert_with(|| common::load_model(model));
        let mut params = common::case_params(case);
        let base = run(sd, &params);
        assert_close(
            &format!("{name} without LoRA"),
            &base,
            &refs.get(&format!("out_{name}_base")),
            1e-3,
        );
        params.loras = loras_of(case);
        let with = run(sd, &params);
        let expected = refs.get(&format!("out_{name}"));
        assert_close(name, &with, &expected, 1e-3);
        // The LoRA's effect is far larger than the tolerance: the comparison means something.
        assert!(
            max_abs_diff(&with, &base) > 0.01,
            "{name}: the LoRA changed nothing"
        );
    }
}

/// LoRAs in bf16 pipelines, whose text encoders stay in float32 from their files while the
/// deltas are bound in bf16: the images are diffusers' float32 ones within bf16's rounding,
/// much closer to them than to the images without the LoRAs, in SD 1.x and SDXL.
#[test]
fn lora_images_in_bf16_match_diffusers_within_rounding() {
    let cases = common::cases("lora");
    let refs = Refs::open("lora");
    for name in ["sd1_kohya", "sd1_both", "sdxl_peft"] {
        let case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let options = stable_diffusion::pipeline::LoadOptions {
            kind: tch::Kind::BFloat16,
            ..Default::default()
        };
        let model = case["model"].as_str().unwrap();
        let sd = StableDiffusion::load(&fixtures().join(model), &options).unwrap();
        let mut params = common::case_params(case);
        params.loras = loras_of(case);
        let with = run(&sd, &params);
        let expected = refs.get(&format!("out_{name}"));
        let base = refs.get(&format!("out_{name}_base"));
        let (err, effect) = (max_abs_diff(&with, &expected), max_abs_diff(&with, &base));
        eprintln!("{name} in bf16: {err:.4} from diffusers' image, {effect:.4} from the base");
        assert!(
            err < 0.04 && err < effect / 2.0,
            "{name}: {err} (effect {effect})"
        );
    }
}

/// Applying LoRAs is per call: a call without them, after calls with them (and after a
/// refused one), gives the image of a freshly loaded pipeline bit for bit, in every family.
#[test]
fn a_call_without_loras_is_untouched_by_the_calls_before_it() {
    for (model, files) in [
        (
            "tiny-sd1",
            vec!["sd1-kohya.safetensors", "sd1-peft.safetensors"],
        ),
        (
            "tiny-sdxl",
            vec!["sdxl-kohya.safetensors", "sdxl-peft.safetensors"],
        ),
    ] {
        let params = GenerateParams {
            prompt: "a lighthouse at dusk".into(),
            negative_prompt: Some("blurry".into()),
            steps: 2,
            guidance: 5.0,
            seed: 7,
            width: Some(32),
            height: Some(32),
            ..Default::default()
        };
        let fresh = run(&common::load_model(model), &params);
        let sd = common::load_model(model);
        for (i, file) in files.iter().enumerate() {
            // Negative weights too.
            let with = GenerateParams {
                loras: vec![LoraWeight::new(lora(file), [0.9, -0.8][i])],
                ..params.clone()
            };
            let changed = run(&sd, &with);
            assert!(max_abs_diff(&changed, &fresh) > 0.01, "{model} {file}");
        }
        let refused = GenerateParams {
            loras: vec![LoraWeight::new(lora("sd2-kohya.safetensors"), 1.0)],
            ..params.clone()
        };
        assert!(sd.generate(&refused, None).is_err(), "{model}: sd2 LoRA");
        assert!(
            bits_equal(&run(&sd, &params), &fresh),
            "{model}: not bit-identical to a fresh load after LoRA calls"
        );
        // Weight 0 is no LoRA at all.
        let zero = GenerateParams {
            loras: vec![LoraWeight::new(lora(files[0]), 0.0)],
            ..params.clone()
        };
        assert!(bits_equal(&run(&sd, &zero), &fresh), "{model}: weight 0");
    }
}

/// A prompt's `<lora:NAME:W>` tag (A1111 syntax) applies `lora_dir`'s NAME.safetensors at W
/// and leaves the text; it gives diffusers' image for that LoRA and weight.
#[test]
fn prompt_tags_apply_loras_by_name() {
    let case = common::case_named("lora", "cases", "sd1_kohya_half");
    let refs = Refs::open("lora");
    let sd = common::load_model("tiny-sd1");
    let mut params = common::case_params(&case);
    params.prompt_syntax = PromptSyntax::A1111;
    params.lora_dir = Some(lora_dir());
    // Mid-prompt, as people write them.
    let prompt = params.prompt.clone();
    let (head, tail) = prompt.split_at(prompt.find(' ').unwrap());
    params.prompt = format!("{head}<lora:sd1-kohya:0.5>{tail}");
    assert_close(
        "tag",
        &run(&sd, &params),
        &refs.get("out_sd1_kohya_half"),
        1e-3,
    );

    for (prompt, says) in [
        ("a fox <lora:missing:1>", "no LoRA named `missing`"),
        ("a fox <lora:../lora/sd1-kohya:1>", "must be a file name"),
        ("a fox <lora:sd1-kohya:heavy>", "`heavy` is not a number"),
        ("a fox <hypernet:x:1>", "only <lora:...>"),
    ] {
        let p = GenerateParams {
            prompt: prompt.into(),
            ..params.clone()
        };
        let e = sd
            .validate(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(says), "{prompt}: {e}");
    }
    let no_dir = GenerateParams {
        lora_dir: None,
        ..params.clone()
    };
    let e = sd.validate(&no_dir).err().unwrap().to_string();
    assert!(e.contains("no LoRA folder"), "{e}");
    // Plain prompts are diffusers' text: the tag is words, and no LoRA is read.
    let plain = GenerateParams {
        prompt_syntax: PromptSyntax::Plain,
        prompt: "a fox <lora:missing:1>".into(),
        ..params
    };
    assert!(sd.validate(&plain).is_ok());
}

/// LoRAs for another family, of another kind or of the wrong shape are refused naming the
/// tensor at fault, and the pipeline's next image is unchanged.
#[test]
fn refused_loras_name_the_tensor_at_fault() {
    for (file, says) in [
        ("loha.safetensors", "LyCORIS LoHa"),
        ("lokr.safetensors", "LyCORIS LoKr"),
    ] {
        let e = Lora::load(&lora_dir().join(file)).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{file}: {e}");
        let e = e.to_string();
        assert!(e.contains(says) && e.contains(file), "{file}: {e}");
    }
    let cases = common::cases("lora");
    let misshaped = cases["loras"]["sd1-misshaped.safetensors"].clone();
    let wrong_key = misshaped["wrong_key"]
        .as_str()
        .or_else(|| misshaped["misshaped_key"].as_str())
        .unwrap_or_else(|| panic!("no wrong key in {misshaped}"))
        .to_string();
    let sd1 = common::load_model("tiny-sd1");
    let sdxl = common::load_model("tiny-sdxl");
    for (sd, file, says) in [
        (&sd1, "sd1-misshaped.safetensors", wrong_key.as_str()),
        (&sdxl, "sd1-kohya.safetensors", "lora_unet_"),
        (&sd1, "sdxl-kohya.safetensors", "does not fit layer"),
        (&sd1, "sd2-kohya.safetensors", "tensor `lora_"),
    ] {
        let params = GenerateParams {
            prompt: "a fox".into(),
            steps: 1,
            width: Some(32),
            height: Some(32),
            loras: vec![LoraWeight::new(lora(file), 1.0)],
            ..Default::default()
        };
        let e = sd.validate(&params).err().unwrap().to_string();
        assert!(e.contains(says) && e.contains(file), "{file}: {e}");
    }
}

/// Hostile LoRA files (a seeded loop over mutations of the fixtures: shapes reshaped, swapped or
/// absurd, tensors dropped or renamed, other dtypes, values that are not finite, bytes flipped
/// or cut): reading and binding never panic, stay bounded in time, leave the file as it was,
/// and whatever is accepted generates an image. Each error names the file or the tensor.
#[test]
fn hostile_lora_files_are_refused_or_applied_never_crash() {
    use common::{parse_safetensors, write_safetensors, Pick, Rng, StTensor};
    use std::time::{Duration, Instant};
    let cases: usize = std::env::var("SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let sd = common::load_model("tiny-sd1");
    let mut rng = Rng::new(0x10ba);
    let bases: Vec<Vec<StTensor>> = ["sd1-kohya.safetensors", "sd1-peft.safetensors"]
        .iter()
        .map(|f| parse_safetensors(&std::fs::read(lora_dir().join(f)).unwrap()))
        .collect();
    let dir = std::env::temp_dir().join(format!("sd-lora-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("case.safetensors");
    let (mut loaded, mut bound, mut generated) = (0, 0, 0);
    let mut failures = Vec::new();
    for case in 0..cases {
        let mut tensors = rng.pick(&bases).clone();
        let i = rng.below(tensors.len());
        let how;
        {
            let (name, dtype, shape, bytes) = &mut tensors[i];
            match rng.below(9) {
                0 => {
                    shape.reverse();
                    how = format!("{name} reversed");
                }
                1 => {
                    let n: u64 = shape.iter().product();
                    *shape = vec![1, n];
                    how = format!("{name} flattened");
                }
                2 => {
                    *shape = vec![0, 1 << 40];
                    bytes.clear();
                    how = format!("{name} [0, 2^40]");
                }
                3 => {
                    let removed = name.clone();
                    tensors.remove(i);
                    how = format!("{removed} dropped");
                }
                4 => {
                    let suffix = *rng.pick(&[".hada_w1_a", ".lora_mid.weight", ".weight", ".x"]);
                    *name = format!("{}{suffix}", name.split('.').next().unwrap());
                    how = format!("renamed {name}");
                }
                5 => {
                    *dtype = rng.pick(&["I32", "U8", "BOOL", "I64"]).to_string();
                    let size = common::dtype_size(dtype);
                    let n: u64 = shape.iter().product();
                    bytes.resize(n as usize * size, 1);
                    how = format!("{name} as {dtype}");
                }
                6 if dtype == "F32" && bytes.len() >= 4 => {
                    let at = 4 * rng.below(bytes.len() / 4);
                    let bad = *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
                    bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
                    how = format!("{name} holds {bad}");
                }
                7 => {
                    // Another rank for the whole module: its up weight no longer matches.
                    if shape.len() >= 2 {
                        shape[0] += 1;
                        let n: u64 = shape.iter().product();
                        bytes.resize(n as usize * common::dtype_size(dtype), 0);
                    }
                    how = format!("{name} one row more");
                }
                _ => {
                    *name = format!("lora_unet_{}", rng.below(1000));
                    how = format!("renamed to {name}");
                }
            }
        }
        let mut data = write_safetensors(&tensors);
        if rng.below(8) == 0 {
            // Bytes flipped in the header, or the file cut short.
            if rng.below(2) == 0 {
                let at = rng.below(data.len().min(4096));
                data[at] ^= 1 << rng.below(8);
            } else {
                data.truncate(rng.below(data.len()));
            }
        }
        std::fs::write(&path, &data).unwrap();
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let lora = Arc::new(Lora::load(&path)?);
            let params = GenerateParams {
                prompt: "a fox".into(),
                steps: 1,
                width: Some(32),
                height: Some(32),
                loras: vec![LoraWeight::new(lora, 0.7)],
                ..Default::default()
            };
            Ok::<_, Error>((params.clone(), sd.validate(&params).map(|_| ())))
        }));
        let what = format!("case {case} ({how})");
        match outcome {
            Err(_) => failures.push(format!("{what}: panicked")),
            Ok(Err(e)) => {
                let m = e.to_string();
                if !(m.contains("case.safetensors") || m.contains("tensor `")) {
                    failures.push(format!("{what}: error names neither file nor tensor: {m}"));
                }
            }
            Ok(Ok((params, validated))) => {
                loaded += 1;
                match validated {
                    Err(e) if !e.to_string().contains("tensor `") => {
                        failures.push(format!("{what}: binding error without a tensor: {e}"))
                    }
                    Err(_) => {}
                    Ok(()) => {
                        bound += 1;
                        // A few accepted ones run, and give finite images.
                        if generated < 3 {
                            generated += 1;
                            match sd.generate(&params, None) {
                                Ok(images) => {
                                    let finite = images.pixels.isfinite().all().int64_value(&[]);
                                    if finite != 1 {
                                        failures.push(format!("{what}: image not finite"));
                                    }
                                }
                                Err(e) => failures.push(format!("{what}: bound but failed: {e}")),
                            }
                        }
                    }
                }
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            failures.push(format!("{what}: took {:?}", start.elapsed()));
        }
        if std::fs::read(&path).unwrap() != data {
            failures.push(format!("{what}: the file was modified"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{cases} hostile LoRA files: {loaded} read, {bound} fit the model, {generated} run");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
