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
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
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
    let out = std::env::temp_dir().join(format!("sd-cli-info-{}-{batch}.png", std::process::id()));
    let model_dir = fixtures().join("tiny-sd1").display().to_string();
    let mut full = args.to_vec();
    full.extend(["--model", model_dir.as_str()]);
    run_sd(&full, &out);
    let paths: Vec<PathBuf> = if batch == 1 {
        vec![out.clone()]
    } else {
        (1..=batch)
            .map(|i| {
                out.with_file_name(format!(
                    "sd-cli-info-{}-{batch}-{i}.png",
                    std::process::id()
                ))
            })
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
