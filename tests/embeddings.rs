//! Textual-inversion embeddings against diffusers' `load_textual_inversion`
//! (`tools/fixtures/embeddings.py`): A1111 `.pt` and `.safetensors`, diffusers'
//! `learned_embeds`, SDXL's `clip_l` / `clip_g`, used by file name from one folder; the files
//! that are not embeddings or are made for another model are reported, and hostile ones never
//! crash.
mod common;

use common::{assert_close, fixtures, max_abs_diff, Refs};
use stable_diffusion::embeddings::Embedding;
use stable_diffusion::pipeline::{GenerateParams, LoadOptions, PromptSyntax, StableDiffusion};

fn embeddings_dir() -> std::path::PathBuf {
    fixtures().join("embeddings")
}

/// `model` with the whole fixture folder of embeddings, as an A1111 user keeps one folder for
/// every model.
fn load(model: &str) -> StableDiffusion {
    let options = LoadOptions {
        embeddings_dir: Some(embeddings_dir()),
        ..Default::default()
    };
    StableDiffusion::load(&fixtures().join(model), &options).unwrap_or_else(|e| panic!("{e}"))
}

/// Every case: the prompt embeddings (and SDXL's pooled ones) equal diffusers' within 1e-5,
/// the images within 1e-3, with plain prompts; A1111 prompts give the same images on SD 1.x /
/// 2.x (on SDXL A1111 pools at the end token where diffusers pools at the embedding's last
/// token, so only the hidden states are compared there).
#[test]
fn embeddings_match_diffusers() {
    let cases = common::cases("embeddings");
    let refs = Refs::open("embeddings");
    let mut pipelines = std::collections::HashMap::new();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let sd: &StableDiffusion = pipelines
            .entry(model.to_string())
            .or_insert_with(|| load(model));
        let params = common::case_params(case);
        let negative = params.negative_prompt.clone().unwrap_or_default();
        if sd.sdxl.is_some() {
            let (states, pooled) = sd
                .encode_prompt_sdxl(&params.prompt, &params.prompt, 1, 0)
                .unwrap();
            assert_close(
                &format!("{name} embeds"),
                &states,
                &refs.get(&format!("embeds_{name}")),
                1e-5,
            );
            assert_close(
                &format!("{name} pooled"),
                &pooled,
                &refs.get(&format!("pooled_{name}")),
                1e-5,
            );
            let (states, pooled) = sd.encode_prompt_sdxl(&negative, &negative, 1, 0).unwrap();
            let want = refs.get(&format!("negative_embeds_{name}"));
            assert_close(&format!("{name} negative embeds"), &states, &want, 1e-5);
            let want = refs.get(&format!("negative_pooled_{name}"));
            assert_close(&format!("{name} negative pooled"), &pooled, &want, 1e-5);
        } else {
            let states = sd.encode_prompt(&params.prompt, 1, 0).unwrap();
            assert_close(
                &format!("{name} embeds"),
                &states,
                &refs.get(&format!("embeds_{name}")),
                1e-5,
            );
            let states = sd.encode_prompt(&negative, 1, 0).unwrap();
            let want = refs.get(&format!("negative_embeds_{name}"));
            assert_close(&format!("{name} negative embeds"), &states, &want, 1e-5);
        }
        let image = sd.generate(&params, None).unwrap().pixels;
        assert_close(name, &image, &refs.get(&format!("out_{name}")), 1e-3);
        // The embedding changed the image by more than the tolerance (diffusers' own change).
        let base = refs.get(&format!("out_{name}_base"));
        assert!(max_abs_diff(&refs.get(&format!("out_{name}")), &base) > 5e-3);
        assert!(max_abs_diff(&image, &base) > 5e-3, "{name}: no change");
        if sd.sdxl.is_none() {
            let a1111 = GenerateParams {
                prompt_syntax: PromptSyntax::A1111,
                ..params
            };
            let image = sd.generate(&a1111, None).unwrap().pixels;
            assert_close(
                &format!("{name} (A1111)"),
                &image,
                &refs.get(&format!("out_{name}")),
                1e-3,
            );
        }
    }
}

/// What is not used is said, by file: not an embedding (two tensors, two terms), made for
/// another family (SDXL's on SD 1.x, SD 1.x's on SDXL), vectors of the wrong width. A model
/// without the folder reads the trigger words as words.
#[test]
fn unused_embeddings_are_reported_by_file() {
    let sd1 = load("tiny-sd1");
    let unused = sd1.unused_embeddings().join("\n");
    for file in [
        "two-tensors.safetensors",
        "two-terms.pt",
        "wrong-width.safetensors",
        "comet.safetensors",
    ] {
        assert!(unused.contains(file), "{file} not reported:\n{unused}");
    }
    assert!(!unused.contains("torin.pt"), "{unused}");
    let e = Embedding::load(&embeddings_dir().join("two-terms.pt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 tensors") && e.contains("two-terms.pt"), "{e}");
    let sdxl = load("tiny-sdxl");
    let unused = sdxl.unused_embeddings().join("\n");
    for file in ["torin.pt", "velvet.safetensors", "wrong-width.safetensors"] {
        assert!(
            unused.contains(file),
            "{file} not reported on SDXL:\n{unused}"
        );
    }
    // The trigger is only a word without the folder: the embeddings are what changed it.
    let plain =
        StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let case = common::case_named("embeddings", "cases", "sd1_pt");
    let image = plain
        .generate(&common::case_params(&case), None)
        .unwrap()
        .pixels;
    assert_close(
        "without the folder",
        &image,
        &Refs::open("embeddings").get("out_sd1_pt_base"),
        1e-3,
    );
    let missing = LoadOptions {
        embeddings_dir: Some(embeddings_dir().join("missing")),
        ..Default::default()
    };
    let e = StableDiffusion::load(&fixtures().join("tiny-sd1"), &missing)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("embeddings folder") && e.contains("missing"),
        "{e}"
    );
}

/// Hostile embedding files (a seeded loop over mutations of the fixtures: shapes, dtypes,
/// names, values that are not finite, bytes flipped or cut): reading never panics, a file that
/// is accepted generates finite images with its name in the prompt, and no file is modified.
#[test]
fn hostile_embedding_files_never_crash() {
    use common::{parse_safetensors, write_safetensors, Pick, Rng};
    let cases: usize = std::env::var("SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng::new(0xe3b);
    let bases: Vec<(&str, Vec<u8>)> = ["lowres.safetensors", "torin.pt", "comet.safetensors"]
        .iter()
        .map(|f| (*f, std::fs::read(embeddings_dir().join(f)).unwrap()))
        .collect();
    let dir = std::env::temp_dir().join(format!("sd-emb-fuzz-{}", std::process::id()));
    let model =
        StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let mut sd = model;
    let (mut read, mut used) = (0, 0);
    let mut failures = Vec::new();
    for case in 0..cases {
        let (file, original) = rng.pick(&bases);
        let mut data = original.clone();
        let how;
        if file.ends_with(".safetensors") && rng.below(2) == 0 {
            let mut tensors = parse_safetensors(&data);
            let i = rng.below(tensors.len());
            let (name, dtype, shape, bytes) = &mut tensors[i];
            match rng.below(5) {
                0 => {
                    *shape = vec![*rng.pick(&[0u64, 76, 1 << 20]), 32];
                    bytes.resize((shape[0] * 32 * 4).min(1 << 16) as usize, 0);
                    how = format!("{name} {shape:?}");
                }
                1 => {
                    *dtype = rng.pick(&["I64", "U8", "BOOL"]).to_string();
                    how = format!("{name} as {dtype}");
                }
                2 => {
                    let at = 4 * rng.below(bytes.len() / 4);
                    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                    how = format!("{name} holds NaN");
                }
                3 => {
                    *name = rng.pick(&["clip_l", "emb_params", "x"]).to_string();
                    how = format!("renamed {name}");
                }
                _ => {
                    *shape = vec![shape.iter().product::<u64>()];
                    how = format!("{name} flattened");
                }
            }
            data = write_safetensors(&tensors);
        } else {
            let at = rng.below(data.len());
            if rng.below(3) == 0 {
                data.truncate(at);
                how = format!("cut at {at}");
            } else {
                data[at] ^= 1 << rng.below(8);
                how = format!("byte {at} flipped");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(file);
        std::fs::write(&path, &data).unwrap();
        let what = format!("case {case} ({file}: {how})");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let found = stable_diffusion::embeddings::Embeddings::from_dir(&dir)?;
            let n = found.list().len();
            sd.set_embeddings(found);
            let stem = file.split('.').next().unwrap();
            let params = GenerateParams {
                prompt: format!("a photo of {stem}"),
                steps: 1,
                width: Some(32),
                height: Some(32),
                ..Default::default()
            };
            let image = sd.generate(&params, None)?;
            Ok::<_, stable_diffusion::Error>((n, image.pixels.isfinite().all().int64_value(&[])))
        }));
        match outcome {
            Err(_) => failures.push(format!("{what}: panicked")),
            Ok(Err(e)) => failures.push(format!("{what}: a bad file failed the run: {e}")),
            Ok(Ok((n, finite))) => {
                read += 1;
                used += n;
                if finite != 1 {
                    failures.push(format!("{what}: image not finite"));
                }
            }
        }
        if std::fs::read(&path).unwrap() != data {
            failures.push(format!("{what}: the file was modified"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{cases} hostile embedding folders: {read} runs, {used} embeddings used");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
