//! Library use in a dozen lines: load a model folder, generate, save a PNG.
//!
//!     cargo run --example txt2img -- models/tiny "a red circle" out/example.png
use stable_diffusion::pipeline::{Control, GenerateParams, LoadOptions, StableDiffusion};
use stable_diffusion::{image_io, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().unwrap_or_else(|| "models/tiny".into()));
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red circle on a white background".into());
    let out = PathBuf::from(args.next().unwrap_or_else(|| "example.png".into()));

    let sd = StableDiffusion::load(&model, &LoadOptions::default())?;
    let params = GenerateParams {
        prompt,
        steps: 20,
        seed: 42,
        ..Default::default()
    };
    let images = sd.txt2img(
        &params,
        Some(&mut |s| {
            eprint!("\rstep {}/{}", s.step, s.total);
            Control::Continue
        }),
    )?;
    eprintln!();
    let rgb = images.to_rgb8()?;
    image_io::save_png(&out, &rgb[0], images.width(), images.height(), &[])?;
    println!("{}", out.display());
    Ok(())
}
