//! The CLI is a thin caller: its arguments reach the library as the library's own fields, so
//! its image is the library's image for the same request, byte for byte.
mod common;

use common::fixtures;
use stable_diffusion::pipeline::{
    GenerateParams, LoadOptions, MicroConditioning, PromptSyntax, StableDiffusion,
};
use std::path::PathBuf;

/// Runs `sd` with `args`, quietly, 2 steps at 32x32, writing to `out`.
fn run_sd(args: &[&str], out: &std::path::Path) {
    // The model-hash cache goes to a folder of the test's own, not the user's.
    let cache = std::env::temp_dir().join(format!("sd-cli-cache-{}", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
        .env("XDG_CACHE_HOME", cache)
        .args(args)
        .args(["--quiet", "--steps", "2", "--width", "32", "--height", "32"])
        .arg("--out")
        .arg(out)
        .output()
        .expect("run sd");
    assert!(
        run.status.success(),
        "sd {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Runs `sd txt2img` on `model` with `args` (32x32, 2 steps, seed 3) and returns its RGB bytes.
fn cli_image(model: &str, args: &[&str]) -> Vec<u8> {
    let model_dir = fixtures().join(model).display().to_string();
    let out: PathBuf = std::env::temp_dir().join(format!(
        "sd-cli-{}-{}.png",
        std::process::id(),
        args.join("_").replace(['/', ' ', '(', ')', ':', ','], "-")
    ));
    let mut full = vec!["txt2img", "--model", model_dir.as_str()];
    full.extend(["--guidance", "5", "--seed", "3"]);
    full.extend(args);
    run_sd(&full, &out);
    let img = image::open(&out).expect("a PNG").to_rgb8().into_raw();
    let _ = std::fs::remove_file(&out);
    img
}

fn library_image(model: &str, params: GenerateParams) -> Vec<u8> {
    let sd = StableDiffusion::load(&fixtures().join(model), &LoadOptions::default()).unwrap();
    let params = GenerateParams {
        steps: 2,
        width: Some(32),
        height: Some(32),
        seed: 3,
        guidance: 5.0,
        ..params
    };
    sd.txt2img(&params, None)
        .unwrap()
        .to_rgb8()
        .unwrap()
        .remove(0)
}

/// SDXL's size and crop arguments are written width first (`WxH`, `X,Y`) and reach the
/// library as diffusers' (height, width) and (top, left).
#[test]
fn sdxl_sizes_are_width_first() {
    let prompt = "a lighthouse";
    let cli = cli_image(
        "tiny-sdxl",
        &[
            "--prompt",
            prompt,
            "--original-size",
            "64x48",
            "--crop",
            "8,4",
            "--target-size",
            "40x24",
        ],
    );
    let micro = MicroConditioning {
        original_size: Some((48, 64)),
        crops_coords_top_left: (4, 8),
        target_size: Some((24, 40)),
        ..Default::default()
    };
    let want = library_image(
        "tiny-sdxl",
        GenerateParams {
            prompt: prompt.into(),
            micro,
            ..Default::default()
        },
    );
    assert!(cli == want, "the CLI's sizes are not the library's");
    let swapped = library_image(
        "tiny-sdxl",
        GenerateParams {
            prompt: prompt.into(),
            micro: MicroConditioning {
                original_size: Some((64, 48)),
                crops_coords_top_left: (8, 4),
                target_size: Some((40, 24)),
                ..micro
            },
            ..Default::default()
        },
    );
    assert!(cli != swapped, "the swapped sizes give the same image");
}

/// The CLI reads prompts as A1111 by default and as they are with `--prompt-syntax plain`.
#[test]
fn prompt_syntax_defaults_to_a1111() {
    let prompt = "a (red:1.4) circle BREAK on a [white] background";
    let library = |prompt_syntax| {
        library_image(
            "tiny-sd1",
            GenerateParams {
                prompt: prompt.into(),
                prompt_syntax,
                ..Default::default()
            },
        )
    };
    let a1111 = library(PromptSyntax::A1111);
    let plain = library(PromptSyntax::Plain);
    assert!(a1111 != plain);
    assert!(cli_image("tiny-sd1", &["--prompt", prompt]) == a1111);
    assert!(
        cli_image(
            "tiny-sd1",
            &["--prompt", prompt, "--prompt-syntax", "plain"]
        ) == plain
    );
}

/// Runs `sd` with `args` and returns the `parameters` text of each image written to `out`
/// (`out-1.png`, `out-2.png`, ... for a batch).
fn cli_parameters(args: &[&str], batch: usize) -> Vec<String> {
    cli_parameters_of(&fixtures().join("tiny-sd1"), args, batch)
}

/// [`cli_parameters`] with `model`.
fn cli_parameters_of(model: &std::path::Path, args: &[&str], batch: usize) -> Vec<String> {
    // Tests run in parallel in one process: each call gets its own files.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stem = format!("sd-cli-info-{}-{call}-{batch}", std::process::id());
    let out = std::env::temp_dir().join(format!("{stem}.png"));
    let model_dir = model.display().to_string();
    let mut full = args.to_vec();
    full.extend(["--model", model_dir.as_str()]);
    run_sd(&full, &out);
    let paths: Vec<PathBuf> = if batch == 1 {
        vec![out.clone()]
    } else {
        (1..=batch)
            .map(|i| out.with_file_name(format!("{stem}-{i}.png")))
            .collect()
    };
    paths
        .iter()
        .map(|p| {
            let text = stable_diffusion::image_io::read_png_text(p).unwrap();
            let _ = std::fs::remove_file(p);
            text.into_iter()
                .find(|(k, _)| k == "parameters")
                .map(|(_, v)| v)
                .unwrap()
        })
        .collect()
}

/// The PNG info as A1111's readers expect it: its sampler names (a Karras schedule on a
/// sampler whose name lacks it as `Schedule type`), the strength an edit ran with (the
/// default included), each image's position in its batch.
#[test]
fn png_info_speaks_a1111() {
    let info = cli_parameters(
        &[
            "txt2img",
            "--prompt",
            "a cat",
            "--scheduler",
            "DPM++ 2M Karras",
        ],
        1,
    );
    assert!(info[0].contains("Sampler: DPM++ 2M Karras,"), "{}", info[0]);
    let info = cli_parameters(
        &["txt2img", "--prompt", "a cat", "--scheduler", "euler_a"],
        1,
    );
    assert!(info[0].contains("Sampler: Euler a,"), "{}", info[0]);
    let info = cli_parameters(&["txt2img", "--prompt", "a cat", "--batch", "2"], 2);
    for (i, text) in info.iter().enumerate() {
        assert!(
            text.contains("Batch size: 2") && text.contains(&format!("Batch pos: {i}")),
            "{text}"
        );
    }
    let init = std::env::temp_dir().join(format!("sd-cli-init-{}.png", std::process::id()));
    stable_diffusion::image_io::write_png(&init, &[128u8; 32 * 32 * 3], 32, 32, &[]).unwrap();
    let init_arg = init.to_str().unwrap();
    let info = cli_parameters(&["img2img", "--prompt", "a cat", "--init", init_arg], 1);
    assert!(info[0].contains("Denoising strength: 0.8"), "{}", info[0]);
    let _ = std::fs::remove_file(&init);
}

/// `--lora PATH:W`, `--lora NAME:W` with `--lora-dir`, and `<lora:NAME:W>` in the prompt reach
/// the library as its own LoRA fields (the library's image, byte for byte); the PNG info
/// carries A1111's `Model hash` (a single file's SHA-256), the LoRAs as tags in the prompt and
/// `Lora hashes` (each file's SHA-256 after its header), quoted as A1111 quotes them.
#[test]
fn loras_reach_the_library_and_the_png_info() {
    use stable_diffusion::hashes::{sha256_bytes, sha256_file};
    use stable_diffusion::lora::{Lora, LoraWeight};
    use std::sync::Arc;
    let dir = fixtures().join("lora");
    let file = dir.join("sd1-kohya.safetensors");
    let lora = Arc::new(Lora::load(&file).unwrap());
    let expected = library_image(
        "tiny-sd1",
        GenerateParams {
            prompt: "a fox".into(),
            loras: vec![LoraWeight::new(lora, 0.7)],
            ..Default::default()
        },
    );
    let plain = library_image(
        "tiny-sd1",
        GenerateParams {
            prompt: "a fox".into(),
            ..Default::default()
        },
    );
    assert!(expected != plain, "the LoRA changes the image");
    let by_path = format!("{}:0.7", file.display());
    assert!(cli_image("tiny-sd1", &["--prompt", "a fox", "--lora", &by_path]) == expected);
    let dir_arg = dir.display().to_string();
    let by_name = ["--lora", "sd1-kohya:0.7", "--lora-dir", dir_arg.as_str()];
    let mut args = vec!["--prompt", "a fox"];
    args.extend(by_name);
    assert!(cli_image("tiny-sd1", &args) == expected);
    // A tag is the same request; the text around it is encoded without it.
    let tagged = library_image(
        "tiny-sd1",
        GenerateParams {
            prompt: "a fox <lora:sd1-kohya:0.7>".into(),
            prompt_syntax: PromptSyntax::A1111,
            lora_dir: Some(dir.clone()),
            ..Default::default()
        },
    );
    let prompt = [
        "--prompt",
        "a fox <lora:sd1-kohya:0.7>",
        "--lora-dir",
        &dir_arg,
    ];
    assert!(cli_image("tiny-sd1", &prompt) == tagged);

    let model = fixtures().join("single").join("tiny-sd1.safetensors");
    // (The tiny model's own tokenizer and configs come from its folder.)
    let config = fixtures().join("tiny-sd1").display().to_string();
    let args = [
        "txt2img", "--prompt", "a fox", "--lora", &by_path, "--config", &config,
    ];
    let info = cli_parameters_of(&model, &args, 1);
    let text = &info[0];
    let model_hash = &sha256_file(&model).unwrap()[..10];
    let bytes = std::fs::read(&file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let lora_hash = &sha256_bytes(&bytes[8 + header..])[..12];
    assert!(text.starts_with("a fox <lora:sd1-kohya:0.7>\n"), "{text}");
    assert!(
        text.contains(&format!("Model hash: {model_hash}, Model: tiny-sd1,")),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("Lora hashes: \"sd1-kohya: {lora_hash}\"")),
        "{text}"
    );
}

/// `--embeddings-dir` reaches the library's `LoadOptions::embeddings_dir`: the CLI's image is
/// the library's for a prompt naming an embedding, and differs from the one without the folder.
#[test]
fn embeddings_dir_reaches_the_library() {
    let dir = fixtures().join("embeddings");
    let options = LoadOptions {
        embeddings_dir: Some(dir.clone()),
        ..Default::default()
    };
    let sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &options).unwrap();
    let params = GenerateParams {
        prompt: "a photo of torin in a garden".into(),
        prompt_syntax: PromptSyntax::A1111,
        steps: 2,
        width: Some(32),
        height: Some(32),
        seed: 3,
        guidance: 5.0,
        ..Default::default()
    };
    let expected = sd
        .txt2img(&params, None)
        .unwrap()
        .to_rgb8()
        .unwrap()
        .remove(0);
    let dir_arg = dir.display().to_string();
    let args = [
        "--prompt",
        "a photo of torin in a garden",
        "--embeddings-dir",
        &dir_arg,
    ];
    assert!(cli_image("tiny-sd1", &args) == expected);
    assert!(cli_image("tiny-sd1", &args[..2]) != expected);
}
