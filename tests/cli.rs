//! The CLI is a thin caller: its arguments reach the library as the library's own fields, so
//! its image is the library's image for the same request, byte for byte.
mod common;

use common::fixtures;
use stable_diffusion::pipeline::{
    GenerateParams, LoadOptions, MicroConditioning, PromptSyntax, StableDiffusion,
};
use std::path::PathBuf;

/// Runs `sd txt2img` on `model` with `args` (32x32, 2 steps, seed 3) and returns its RGB bytes.
fn cli_image(model: &str, args: &[&str]) -> Vec<u8> {
    let out: PathBuf = std::env::temp_dir().join(format!(
        "sd-cli-{}-{}.png",
        std::process::id(),
        args.join("_").replace(['/', ' ', '(', ')', ':', ','], "-")
    ));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(["txt2img", "--quiet", "--model"])
        .arg(fixtures().join(model))
        .args([
            "--steps", "2", "--width", "32", "--height", "32", "--seed", "3",
        ])
        .args(["--guidance", "5"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run sd");
    assert!(
        run.status.success(),
        "sd {args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
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
