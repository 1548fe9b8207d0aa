//! What the engine features cost, on the product path (weights loaded from files, the
//! pipeline's own calls), ours only (`make bench-engine`):
//! - previews: a txt2img run with a preview made after every step (the cheap latent-to-RGB map
//!   of `sd_step_preview`), against the same run without, alternating, median of the rounds;
//! - the tiny autoencoder's decode against the VAE's at one size (a TAESD-size tiny autoencoder
//!   with seeded random weights: its cost does not depend on the values);
//! - the VAE decode of one large image in tiles against untiled, each in a fresh process that
//!   loads the VAE alone, with its peak RSS; with `--python PY` (the venv of
//!   `tools/make_fixtures.sh`) diffusers' tiled and untiled `AutoencoderKL` decode alternate
//!   with ours (`tools/bench/diffusers_bench.py decode`), and the table gives the ratios.
//!
//!     cargo run --release --example bench_engine -- --model ~/.cache/stable-diffusion-bench/sd15-random \
//!         [--size 256] [--steps 4] [--rounds 2] [--decode-size 512] [--large 1024] [--tile 512] \
//!         [--python .venv-fixtures/bin/python] [--large-only]
//!
//! The machine must be idle (each run waits for it and flags a busy one).
#[path = "bench_util/mod.rs"]
mod bench_util;

use bench_util::{load_average, median, physical_cores, status_mib, wait_for_idle};
use stable_diffusion::models::tiny_vae::TinyVaeParts;
use stable_diffusion::models::traits::Autoencoder;
use stable_diffusion::models::{AutoencoderTiny, TinyVaeConfig};
use stable_diffusion::pipeline::{
    load_vae, vae_decode_with, Control, GenerateParams, LoadOptions, StableDiffusion, StepInfo,
    VaeTiling,
};
use stable_diffusion::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};

struct Args {
    model: PathBuf,
    size: i64,
    steps: usize,
    rounds: usize,
    decode_size: i64,
    large: i64,
    tile: i64,
    /// Internal: one large decode in this process (`tiled` or `untiled`), printing its figures.
    child: Option<String>,
    /// diffusers' side of the large decode, run with this Python.
    python: Option<PathBuf>,
    /// Only the large decodes.
    large_only: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        model: PathBuf::new(),
        size: 256,
        steps: 4,
        rounds: 2,
        decode_size: 512,
        large: 1024,
        tile: 512,
        child: None,
        python: None,
        large_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| Error::invalid(format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<i64>()
                .map_err(|_| Error::invalid(format!("{flag}: `{v}` is not a number")))
        };
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()?),
            "--size" => a.size = number(value()?)?,
            "--steps" => a.steps = number(value()?)? as usize,
            "--rounds" => a.rounds = number(value()?)? as usize,
            "--decode-size" => a.decode_size = number(value()?)?,
            "--large" => a.large = number(value()?)?,
            "--tile" => a.tile = number(value()?)?,
            "--child" => a.child = Some(value()?),
            "--python" => a.python = Some(PathBuf::from(value()?)),
            "--large-only" => a.large_only = true,
            other => return Err(Error::invalid(format!("unknown argument {other}"))),
        }
    }
    if a.model.as_os_str().is_empty() {
        return Err(Error::invalid("--model FOLDER is required"));
    }
    Ok(a)
}

/// `(seconds, peak RSS in GiB)` from a child's JSON line (`decode_s`, `peak_rss_mib`).
fn parse_figures(text: &str) -> Option<(f64, f64)> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((
        v["decode_s"].as_f64()?,
        v["peak_rss_mib"].as_f64()? / 1024.0,
    ))
}

fn seconds(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// One large decode in this process, by the model's VAE loaded alone (as diffusers' side
/// loads its `AutoencoderKL` alone): prints `seconds peak_rss_gib` for the parent.
fn child(a: &Args, how: &str) -> Result<()> {
    let vae = load_vae(&a.model.join("vae"), &LoadOptions::default())?;
    let scale = vae.spatial_scale();
    let latents = Tensor::randn(
        [1, vae.latent_channels(), a.large / scale, a.large / scale],
        (Kind::Float, tch::Device::Cpu),
    );
    let params = GenerateParams {
        vae_tiling: if how == "tiled" {
            VaeTiling::On
        } else {
            VaeTiling::Off
        },
        vae_tile_size: Some(a.tile),
        ..Default::default()
    };
    let _no_grad = tch::no_grad_guard();
    let start = Instant::now();
    let images = vae_decode_with(&vae, &latents, &params, &|| Ok(()))?;
    let took = seconds(start);
    assert_eq!(images.size()[3], a.large);
    println!(
        "{{\"decode_s\": {took}, \"peak_rss_mib\": {}}}",
        status_mib("VmHWM:")
    );
    Ok(())
}

/// Previews and the tiny autoencoder, in this process; true when a run was flagged.
fn small_figures(a: &Args) -> Result<bool> {
    let mut flagged = false;
    let sd = StableDiffusion::load(&a.model, &LoadOptions::default())?;

    // Previews after every step, against none.
    let params = GenerateParams {
        prompt: "a lighthouse on a cliff at sunset".into(),
        steps: a.steps,
        width: Some(a.size),
        height: Some(a.size),
        seed: 3,
        ..Default::default()
    };
    sd.generate(&params, None)?; // warm: packs the weights once
    let (mut plain, mut previewed, mut preview_costs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        flagged |= !wait_for_idle();
        let start = Instant::now();
        sd.generate(&params, None)?;
        plain.push(seconds(start));
        flagged |= !wait_for_idle();
        let mut spent = 0.0;
        let mut on_step = |info: &StepInfo| {
            let t = Instant::now();
            let images = info.previews().expect("preview");
            assert!(!images.is_empty());
            spent += seconds(t);
            Control::Continue
        };
        let start = Instant::now();
        sd.generate(&params, Some(&mut on_step))?;
        previewed.push(seconds(start));
        preview_costs.push(spent / a.steps as f64);
    }
    let (p, q) = (median(plain), median(previewed));
    let (size, steps) = (a.size, a.steps);
    let change = 100.0 * (q / p - 1.0);
    let one = 1000.0 * median(preview_costs);
    println!(
        "txt2img {size}x{size}, {steps} steps: {p:.2} s without previews, {q:.2} s with one \
         after every step ({change:+.1} %); one preview {one:.3} ms"
    );

    // The tiny autoencoder's decode against the VAE's.
    let scale = sd.vae_scale_factor();
    let side = a.decode_size / scale;
    let latents = Tensor::randn([1, 4, side, side], (Kind::Float, tch::Device::Cpu));
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let both = TinyVaeParts {
        encoder: false,
        decoder: true,
    };
    let config = TinyVaeConfig::default();
    let tiny = AutoencoderTiny::new(vs.root(), &config, both)?;
    let _no_grad = tch::no_grad_guard();
    let (mut full, mut small) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds.max(2) {
        flagged |= !wait_for_idle();
        let start = Instant::now();
        sd.decode_latents(&latents)?;
        full.push(seconds(start));
        flagged |= !wait_for_idle();
        let start = Instant::now();
        drop(tiny.decode(&latents)?);
        small.push(seconds(start));
    }
    let (f, t) = (median(full), median(small));
    let (side, ratio) = (a.decode_size, f / t);
    println!(
        "decode {side}x{side}: VAE {f:.2} s, tiny autoencoder (TAESD size, 64 channels) \
         {t:.3} s ({ratio:.1}x faster)"
    );

    Ok(flagged)
}

fn main() -> Result<()> {
    let a = args()?;
    if let Some(how) = &a.child {
        return child(&a, how);
    }
    println!(
        "bench_engine: {} | {} physical cores, {} threads | load {}",
        a.model.display(),
        physical_cores(),
        tch::get_num_threads(),
        load_average()
    );
    let mut flagged = false;
    if !a.large_only {
        flagged |= small_figures(&a)?;
    }

    // One large decode, tiled and untiled, each in a fresh process; ours, then diffusers'.
    let exe = std::env::current_exe().map_err(|e| Error::invalid(e.to_string()))?;
    let model = a.model.to_str().unwrap_or_default().to_string();
    let mut figures = std::collections::BTreeMap::<(&str, &str), Vec<(f64, f64)>>::new();
    for round in 0..a.rounds {
        for how in ["untiled", "tiled"] {
            let mut sides = vec!["ours"];
            if a.python.is_some() {
                sides.push("diffusers");
            }
            for side in sides {
                flagged |= !wait_for_idle();
                let mut command = match (side, &a.python) {
                    ("diffusers", Some(python)) => {
                        let mut c = std::process::Command::new(python);
                        let tile = if how == "tiled" { a.tile } else { 0 };
                        c.arg("tools/bench/diffusers_bench.py")
                            .arg("decode")
                            .arg(&model);
                        c.args([a.large.to_string(), tile.to_string()]);
                        c.args([tch::get_num_threads().to_string(), round.to_string()]);
                        c
                    }
                    _ => {
                        let mut c = std::process::Command::new(&exe);
                        c.args(["--model", &model, "--child", how]);
                        c.args([
                            "--large",
                            &a.large.to_string(),
                            "--tile",
                            &a.tile.to_string(),
                        ]);
                        c
                    }
                };
                let out = command
                    .output()
                    .map_err(|e| Error::invalid(format!("{side} {how}: {e}")))?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let v = parse_figures(&text).ok_or_else(|| {
                    Error::invalid(format!(
                        "the {side} {how} decode failed: {text} {}",
                        String::from_utf8_lossy(&out.stderr)
                    ))
                })?;
                figures.entry((how, side)).or_default().push(v);
            }
        }
    }
    let medians = |runs: &Vec<(f64, f64)>| {
        (
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
        )
    };
    for how in ["untiled", "tiled"] {
        let Some(ours) = figures.get(&(how, "ours")).map(medians) else {
            continue;
        };
        let (large, tile) = (a.large, a.tile);
        let mut line = format!(
            "decode {large}x{large} {how} (tile {tile}): ours {:.1} s, peak RSS {:.2} GiB",
            ours.0, ours.1
        );
        if let Some(theirs) = figures.get(&(how, "diffusers")).map(medians) {
            line += &format!(
                "; diffusers {:.1} s, {:.2} GiB; ratio {:.2}x time, {:.2}x RSS",
                theirs.0,
                theirs.1,
                ours.0 / theirs.0,
                ours.1 / theirs.1
            );
        }
        println!("{line} (whole-process peak RSS)");
    }
    if flagged {
        println!("FLAGGED: the machine was busy during some runs; these figures mean little");
    }
    Ok(())
}
