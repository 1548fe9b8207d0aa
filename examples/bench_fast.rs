//! What each opt-in fast mode buys and costs: `make bench-fast`.
//!
//!     cargo run --release --example bench_fast -- [--model DIR] [--size N] [--steps N]
//!         [--prompts N] [--modes cache:3,cache:3:2,tome:0.5,int8] [--guidance 7.5]
//!         [--threads N] [--prompt-set scenes|shapes] [--eval-images N]
//!
//! After a short warm-up run of every mode, for each prompt of a fixed list (`scenes`, or for models/tiny `shapes`: captions of the
//! held-out colour x shape combinations its evaluation uses) and its seed, the exact run and then every mode, one after
//! the other, so that a drift of the machine touches them alike. Per mode: the time from the
//! call to the last denoising step (text encoding and sampling; the decode, the same for every
//! mode, is left out) summed over the prompts and its speed-up over the exact run, and the cost
//! in quality against the exact image of the same seed: PSNR (mean and worst over the prompts)
//! and the largest pixel difference in 8-bit levels. With `--eval-images N` (models/tiny, whose
//! analytic checker reads colour and shape) it also runs `sd eval`'s held-out prompts, N of
//! them and as many with the empty prompt, under every mode and prints the colour + shape
//! adherence next to the exact run's.
//!
//! Modes: `exact`; `cache:N[:B]` step caching with a full pass every N UNet calls (branch B,
//! default 0); `tome:R` token merging at ratio R; `int8` int8 linear layers; `+` combines them
//! (`cache:3+tome:0.5`).
#[path = "bench_util/mod.rs"]
mod bench_util;

use bench_util::{load_average, physical_cores, wait_for_idle};
use stable_diffusion::pipeline::{
    Control, FastModes, GenerateParams, LoadOptions, StableDiffusion, StepInfo,
};
use stable_diffusion::train::eval::{evaluate, held_out_specs, EvalOptions};
use stable_diffusion::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;

const PROMPTS: [&str; 6] = [
    "a red fox in the snow, detailed fur, soft morning light",
    "a lighthouse on a cliff at sunset, oil painting",
    "a bowl of ramen on a wooden table, studio photo",
    "a futuristic city street at night, neon signs, rain",
    "a portrait of an old sailor with a grey beard",
    "a field of sunflowers under a blue sky",
];

struct Options {
    model: PathBuf,
    size: Option<i64>,
    steps: usize,
    prompts: usize,
    modes: Vec<(String, FastModes)>,
    guidance: f64,
    threads: i32,
    shapes: bool,
    eval_images: usize,
}

fn parse_mode(text: &str) -> Result<FastModes> {
    let bad = || {
        Error::invalid(format!(
            "--modes: `{text}` is not exact, cache:N[:B], tome:R, int8 or a `+` of them"
        ))
    };
    let mut m = FastModes::default();
    for part in text.split('+') {
        let fields: Vec<&str> = part.split(':').collect();
        match fields.as_slice() {
            ["exact"] => {}
            ["cache", n] => m.cache_interval = n.parse().map_err(|_| bad())?,
            ["cache", n, b] => {
                m.cache_interval = n.parse().map_err(|_| bad())?;
                m.cache_branch = b.parse().map_err(|_| bad())?;
            }
            ["tome", r] => m.token_merging = r.parse().map_err(|_| bad())?,
            ["int8"] => m.int8_linear = true,
            _ => return Err(bad()),
        }
    }
    Ok(m)
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        model: PathBuf::from("models/tiny"),
        size: None,
        steps: 20,
        prompts: 3,
        modes: Vec::new(),
        guidance: 7.5,
        threads: physical_cores() as i32,
        shapes: false,
        eval_images: 0,
    };
    let mut modes = "cache:2,cache:3,cache:3:2,tome:0.5,int8,cache:3+tome:0.5+int8".to_string();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| Error::invalid(format!("{flag} needs a value")))
        };
        let number = |v: String| -> Result<f64> {
            v.parse()
                .map_err(|_| Error::invalid(format!("{flag}: `{v}` is not a number")))
        };
        match flag.as_str() {
            "--model" => o.model = PathBuf::from(value()?),
            "--size" => o.size = Some(number(value()?)? as i64),
            "--steps" => o.steps = number(value()?)? as usize,
            "--prompts" => o.prompts = (number(value()?)? as usize).max(1),
            "--modes" => modes = value()?,
            "--guidance" => o.guidance = number(value()?)?,
            "--threads" => o.threads = number(value()?)? as i32,
            "--eval-images" => o.eval_images = number(value()?)? as usize,
            "--prompt-set" => match value()?.as_str() {
                "scenes" => o.shapes = false,
                "shapes" => o.shapes = true,
                other => {
                    return Err(Error::invalid(format!(
                        "--prompt-set `{other}`: use scenes or shapes"
                    )))
                }
            },
            other => return Err(Error::invalid(format!("unknown option {other}"))),
        }
    }
    if !o.shapes {
        o.prompts = o.prompts.min(PROMPTS.len());
    }
    for m in modes.split(',').filter(|m| !m.is_empty() && *m != "exact") {
        o.modes.push((m.to_string(), parse_mode(m)?));
    }
    Ok(o)
}

/// Seconds from the call to the last step, and the image as 8-bit RGB.
fn timed_run(sd: &StableDiffusion, params: &GenerateParams) -> Result<(f64, Vec<u8>)> {
    let start = Instant::now();
    let mut last_step = 0.0;
    let mut on_step = |_: &StepInfo| {
        last_step = start.elapsed().as_secs_f64();
        Control::Continue
    };
    let images = sd.generate(params, Some(&mut on_step))?;
    let rgb = images.to_rgb8()?.swap_remove(0);
    Ok((last_step, rgb))
}

/// PSNR in dB over 8-bit images and the largest difference in levels.
fn compare(a: &[u8], b: &[u8]) -> (f64, u8) {
    let mut sq = 0.0;
    let mut max = 0u8;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sq += f64::from(d) * f64::from(d);
    }
    let mse = sq / a.len().max(1) as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    (psnr, max)
}

#[derive(Default)]
struct Tally {
    seconds: f64,
    psnr: Vec<f64>,
    max_diff: u8,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse_options(&args)?;
    tch::set_num_threads(o.threads);
    let sd = StableDiffusion::load(&o.model, &LoadOptions::default())?;
    let size = o.size.unwrap_or_else(|| sd.default_size());
    println!(
        "fast modes on {} at {size}x{size}, {} steps, guidance {}, {} prompts, {} threads",
        o.model.display(),
        o.steps,
        o.guidance,
        o.prompts,
        o.threads
    );
    println!("load average before: {}", load_average());
    // Warm-up: the first call of each shape pays for allocations and kernel choices.
    for fast in std::iter::once(FastModes::default()).chain(o.modes.iter().map(|m| m.1)) {
        timed_run(
            &sd,
            &GenerateParams {
                prompt: "warm-up".into(),
                steps: o.steps.min(3),
                guidance: o.guidance,
                width: Some(size),
                height: Some(size),
                fast,
                ..Default::default()
            },
        )?;
    }
    let idle = wait_for_idle();
    let mut exact = Tally::default();
    let mut tallies: Vec<Tally> = o.modes.iter().map(|_| Tally::default()).collect();
    let prompts: Vec<String> = if o.shapes {
        held_out_specs(o.prompts, size as usize)
            .iter()
            .map(|s| s.caption())
            .collect()
    } else {
        PROMPTS
            .iter()
            .take(o.prompts)
            .map(|p| p.to_string())
            .collect()
    };
    for (i, prompt) in prompts.iter().enumerate() {
        let params = GenerateParams {
            prompt: prompt.clone(),
            steps: o.steps,
            guidance: o.guidance,
            seed: 42 + i as u64,
            width: Some(size),
            height: Some(size),
            ..Default::default()
        };
        let (seconds, reference) = timed_run(&sd, &params)?;
        exact.seconds += seconds;
        for ((name, fast), tally) in o.modes.iter().zip(&mut tallies) {
            let (seconds, rgb) = timed_run(
                &sd,
                &GenerateParams {
                    fast: *fast,
                    ..params.clone()
                },
            )?;
            let (psnr, max) = compare(&reference, &rgb);
            eprintln!("  prompt {i} {name}: {seconds:.2} s, PSNR {psnr:.1} dB, max {max}");
            tally.seconds += seconds;
            tally.psnr.push(psnr);
            tally.max_diff = tally.max_diff.max(max);
        }
    }
    println!("load average after: {}", load_average());
    println!();
    println!("| mode | sampling s | speed-up | PSNR mean / worst dB | max diff (levels) |");
    println!("| --- | --- | --- | --- | --- |");
    println!("| exact | {:.2} | 1.00x | - | 0 |", exact.seconds);
    for ((name, _), t) in o.modes.iter().zip(&tallies) {
        let mean = t.psnr.iter().sum::<f64>() / t.psnr.len() as f64;
        let worst = t.psnr.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {name} | {:.2} | {:.2}x | {mean:.1} / {worst:.1} | {} |",
            t.seconds,
            exact.seconds / t.seconds,
            t.max_diff
        );
    }
    if !idle {
        println!("(the machine was busy when the runs started: the times are not reliable)");
    }

    if o.eval_images > 0 {
        println!();
        println!(
            "adherence (sd eval's held-out prompts, {} images and as many empty prompts):",
            o.eval_images
        );
        println!("| mode | held-out colour + shape | empty prompt (chance) | seconds |");
        println!("| --- | --- | --- | --- |");
        let exact = FastModes::default();
        for (name, fast) in std::iter::once(("exact".to_string(), exact)).chain(o.modes.clone()) {
            let report = evaluate(
                &sd,
                &EvalOptions {
                    images: o.eval_images,
                    other_images: 0,
                    fast,
                    ..Default::default()
                },
            )?;
            let pct = |t: &stable_diffusion::train::checker::Tally| t.pct(t.colour_and_shape);
            println!(
                "| {name} | {:.1} % | {:.1} % | {:.0} |",
                pct(&report.held_out),
                pct(&report.empty_prompt),
                report.seconds
            );
        }
    }
    Ok(())
}
