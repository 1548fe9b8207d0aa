//! Ours against diffusers on the real product path: `make bench`.
//!
//!     cargo run --release --example bench -- [--sizes 256,512] [--steps 20] [--rounds 2]
//!         [--threads N] [--guidance 7] [--seed 42] [--dtype fp32|bf16] [--family sd15|sdxl]
//!         [--dir DIR] [--python PY] [--ours-only] [--plain-weights]
//!
//! Both sides load the same SD 1.5-size (or, with `--family sdxl`, SDXL-base-size) diffusers
//! folder of seeded random weights (float32, written once by `tools/bench/diffusers_bench.py`
//! into DIR, by default `~/.cache/stable-diffusion-bench/sd15-random` or `sdxl-random`, outside
//! git) in a fresh process and run
//! txt2img with its Euler scheduler and CFG on the CPU in float32, with the same number of
//! intra-op threads (default: the physical cores). Each round runs both, in alternating order,
//! each in a new process; the table gives medians over the rounds and the ratio ours/diffusers.
//! Rows: load, text encode (positive and negative prompt, warm), time to the end of the first
//! step (from the txt2img call, and from spawning the cold process, which adds imports and the
//! load), one step (UNet on the CFG batch of 2 plus the scheduler: median gap between step
//! callbacks), decode (last step to image), the txt2img call, the cold process (spawn to exit,
//! imports and library loading included) and the process's peak RSS. The images of the two
//! sides are compared (max difference in 8-bit levels). `--dtype bf16` measures the CPU fast
//! mode: ours holds and runs the weights in bfloat16, diffusers runs its float32 pipeline under
//! `torch.autocast("cpu", dtype=torch.bfloat16)`; the images then differ by rounding.
//! `--plain-weights` and `--packed-weights` run our side with `WeightKernels::Plain` or
//! `WeightKernels::Packed` instead of the family's default (`WeightKernels::Auto`).
//!
//! On two cores any other busy process makes every figure meaningless, so before each run the
//! bench samples /proc/stat for 2 s and waits (up to a minute) for other processes to be idle;
//! a run that started on a busy machine is flagged in the table and the summary says so.
use serde_json::Value;
use stable_diffusion::pipeline::{
    Control, GenerateParams, LoadOptions, StableDiffusion, StepInfo, WeightKernels,
};
use stable_diffusion::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "bench_util/mod.rs"]
mod bench_util;
use bench_util::{
    busy_cores, load_average, median, physical_cores, status_mib, wait_for_idle, BUSY_CORES,
};

const PROMPT: &str = "a red fox in the snow, detailed fur, soft morning light";
const NEGATIVE: &str = "blurry, low quality";

struct Options {
    sizes: Vec<i64>,
    steps: usize,
    rounds: usize,
    threads: usize,
    guidance: f64,
    seed: u64,
    dtype: String,
    family: String,
    dir: PathBuf,
    python: PathBuf,
    ours_only: bool,
    /// "auto", "plain" or "packed" (`WeightKernels`), handed to our child process.
    kernels: &'static str,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    let mut o = Options {
        sizes: vec![256, 512],
        steps: 20,
        rounds: 2,
        threads: physical_cores(),
        guidance: 7.0,
        seed: 42,
        dtype: "fp32".into(),
        family: "sd15".into(),
        dir: PathBuf::new(),
        python: repo.join(".venv-fixtures/bin/python"),
        ours_only: false,
        kernels: "auto",
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--ours-only" => o.ours_only = true,
            "--plain-weights" => o.kernels = "plain",
            "--packed-weights" => o.kernels = "packed",
            _ => {}
        }
        if matches!(
            flag.as_str(),
            "--ours-only" | "--plain-weights" | "--packed-weights"
        ) {
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| Error::invalid(format!("{flag} needs a value")))?;
        let bad = |e: &dyn std::fmt::Display| Error::invalid(format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--sizes" => {
                o.sizes = value
                    .split(',')
                    .map(|s| s.trim().parse::<i64>().map_err(|e| bad(&e)))
                    .collect::<Result<_>>()?
            }
            "--steps" => o.steps = value.parse().map_err(|e| bad(&e))?,
            "--rounds" => o.rounds = value.parse().map_err(|e| bad(&e))?,
            "--threads" => o.threads = value.parse().map_err(|e| bad(&e))?,
            "--guidance" => o.guidance = value.parse().map_err(|e| bad(&e))?,
            "--seed" => o.seed = value.parse().map_err(|e| bad(&e))?,
            "--dtype" if value == "fp32" || value == "bf16" => o.dtype = value.clone(),
            "--dtype" => return Err(Error::invalid(format!("--dtype {value}: fp32 or bf16"))),
            "--family" if value == "sd15" || value == "sdxl" => o.family = value.clone(),
            "--family" => return Err(Error::invalid(format!("--family {value}: sd15 or sdxl"))),
            "--dir" => o.dir = PathBuf::from(value),
            "--python" => o.python = PathBuf::from(value),
            _ => return Err(Error::invalid(format!("unknown option {flag}"))),
        }
    }
    if o.dir.as_os_str().is_empty() {
        o.dir = std::env::var_os("SD_BENCH_DIR").map_or_else(
            || home.join(format!(".cache/stable-diffusion-bench/{}-random", o.family)),
            PathBuf::from,
        );
    }
    // One step is the few-step (Turbo) case: its "one step" row is then the first step.
    if o.steps == 0 || o.rounds == 0 || o.threads == 0 || o.sizes.is_empty() {
        return Err(Error::invalid(
            "--steps, --rounds and --threads must be at least 1, --sizes not empty",
        ));
    }
    if let Some(s) = o.sizes.iter().find(|&&s| s < 64 || s % 8 != 0) {
        return Err(Error::invalid(format!(
            "--sizes: {s} is not a multiple of 8 of at least 64"
        )));
    }
    Ok(o)
}

/// Our side of one run, in this (fresh) process: the counterpart of diffusers_bench.py's `run`.
fn child(args: &[String]) -> Result<()> {
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let dir = PathBuf::from(arg(0));
    let parse = |i: usize| -> Result<f64> {
        arg(i)
            .parse::<f64>()
            .map_err(|e| Error::invalid(format!("child argument {i}: {e}")))
    };
    let (size, steps, guidance) = (parse(1)? as i64, parse(2)? as usize, parse(3)?);
    let (threads, seed, image_out) = (parse(4)? as i32, parse(5)? as u64, PathBuf::from(arg(6)));
    let kind = match arg(7).as_str() {
        "bf16" => tch::Kind::BFloat16,
        _ => tch::Kind::Float,
    };
    tch::set_num_threads(threads);

    let t0 = Instant::now();
    let sd = StableDiffusion::load(
        &dir,
        &LoadOptions {
            kind,
            weight_kernels: match arg(8).as_str() {
                "plain" => WeightKernels::Plain,
                "packed" => WeightKernels::Packed,
                _ => WeightKernels::Auto,
            },
            ..Default::default()
        },
    )?;
    let load_s = t0.elapsed().as_secs_f64();

    let params = GenerateParams {
        prompt: PROMPT.into(),
        negative_prompt: Some(NEGATIVE.into()),
        steps,
        guidance,
        seed,
        width: Some(size),
        height: Some(size),
        ..Default::default()
    };
    let mut marks = Vec::with_capacity(steps);
    let mut first_unix_s = f64::NAN;
    let mut on_step = |_: &StepInfo| {
        if marks.is_empty() {
            first_unix_s = unix_seconds();
        }
        marks.push(Instant::now());
        Control::Continue
    };
    let t0 = Instant::now();
    let images = sd.txt2img(&params, Some(&mut on_step))?;
    let end = Instant::now();
    let rgb = images.to_rgb8()?;
    std::fs::write(&image_out, &rgb[0]).map_err(|e| Error::io(&image_out, e))?;

    let encode: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let _g = tch::no_grad_guard();
            // As a generation encodes: each layer's in-place pages go once it has run.
            let _layers = stable_diffusion::models::clip::release_layers_as_they_run();
            if sd.sdxl.is_some() {
                let _ = (
                    sd.encode_prompt_sdxl(PROMPT, PROMPT, 1, 0)?,
                    sd.encode_prompt_sdxl(NEGATIVE, NEGATIVE, 1, 0)?,
                );
            } else {
                let _ = sd.encode_prompt_pair(PROMPT, NEGATIVE, 1, 0)?;
            }
            // As a generation does once its conditioning is made: the next encode pages the
            // text encoders' weights back in, and that is part of what it costs.
            sd.release_idle_weights();
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    let first = marks
        .first()
        .ok_or_else(|| Error::Internal("no step callback".into()))?;
    let mut gaps: Vec<f64> = marks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    if gaps.is_empty() {
        gaps.push((*first - t0).as_secs_f64()); // one step: as diffusers_bench.py counts it
    }
    let last = marks.last().unwrap_or(first);
    let result = serde_json::json!({
        "load_s": load_s,
        "first_step_s": (*first - t0).as_secs_f64(),
        "first_step_unix_s": first_unix_s,
        "step_s": median(gaps),
        "decode_s": (end - *last).as_secs_f64(),
        "total_s": (end - t0).as_secs_f64(),
        "encode_s": median(encode),
        "peak_rss_mib": status_mib("VmHWM:"),
        "threads": tch::get_num_threads(),
    });
    println!("{result}");
    Ok(())
}

/// Wall-clock seconds since the epoch: the one clock the bench and its children share, so that
/// the time from spawning a child to its first step can be measured across processes.
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64())
}

struct Run {
    figures: Value,
    cold_s: f64,
    /// From spawning the child to the end of its first step: imports, library loading, the
    /// model's load and the first step, which is what a user waits for before any progress.
    spawn_to_first_step_s: f64,
    disturbed: bool,
    image: Vec<u8>,
}

fn run_side(side: &str, cmd: &mut Command, image: &Path) -> Result<Run> {
    let idle = wait_for_idle();
    let spawned_unix_s = unix_seconds();
    let start = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| Error::Internal(format!("cannot start {side}: {e}")))?;
    let cold_s = start.elapsed().as_secs_f64();
    // Other processes during the run: the child's own CPU time is not separable here, so a
    // run counts as disturbed when the machine was busy right before or right after it.
    let idle_after = busy_cores(Duration::from_secs(1)) <= BUSY_CORES;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{side} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| Error::Internal(format!("{side} printed no figures:\n{stdout}")))?;
    let figures: Value =
        serde_json::from_str(line).map_err(|e| Error::Internal(format!("{side}: {e}")))?;
    let image = std::fs::read(image).map_err(|e| Error::io(image, e))?;
    let spawn_to_first_step_s =
        figures["first_step_unix_s"].as_f64().unwrap_or(f64::NAN) - spawned_unix_s;
    Ok(Run {
        figures,
        cold_s,
        spawn_to_first_step_s,
        disturbed: !idle || !idle_after,
        image,
    })
}

fn fmt_value(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        "-".into()
    } else if unit == "MiB" {
        format!("{:.2} GiB", v / 1024.0)
    } else {
        format!("{v:.2} s")
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        return child(&args[1..]);
    }
    let o = parse_options(&args)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = repo.join("tools/bench/diffusers_bench.py");
    if !o.python.is_file() {
        return Err(Error::invalid(format!(
            "{} not found: run `bash tools/make_fixtures.sh` once (it creates the venv), or pass \
             --python",
            o.python.display()
        )));
    }
    let status = Command::new(&o.python)
        .arg(&script)
        .arg("make-folder")
        .arg(&o.dir)
        .arg(&o.family)
        .status()
        .map_err(|e| Error::Internal(format!("cannot run {}: {e}", o.python.display())))?;
    if !status.success() {
        return Err(Error::Internal(format!(
            "writing the model folder failed: {status}"
        )));
    }
    let weight_bytes: u64 = ["unet", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .filter_map(|c| std::fs::read_dir(o.dir.join(c)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let exe = std::env::current_exe().map_err(|e| Error::Internal(e.to_string()))?;
    let scratch = std::env::temp_dir().join(format!("sd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "bench: {}; {} threads each; {} {}{}; {} steps, Euler, guidance {}, seed {}; {} \
         round(s); weights {:.2} GiB (fp32 files); load average at start {}",
        cpu,
        o.threads,
        o.family,
        o.dtype,
        match o.kernels {
            "auto" => String::new(),
            kernels => format!(", {kernels} weights"),
        },
        o.steps,
        o.guidance,
        o.seed,
        o.rounds,
        weight_bytes as f64 / (1u64 << 30) as f64,
        load_average()
    );
    let sides: &[&str] = if o.ours_only {
        &["ours"]
    } else {
        &["ours", "diffusers"]
    };
    let mut any_disturbed = false;
    for &size in &o.sizes {
        let mut runs: Vec<Vec<Run>> = sides.iter().map(|_| Vec::new()).collect();
        for round in 0..o.rounds {
            for k in 0..sides.len() {
                // Alternate who goes first, so that neither always runs on a warmer machine.
                let i = (k + round) % sides.len();
                let image = scratch.join(format!("{}-{size}.rgb", sides[i]));
                let common = [
                    o.dir.display().to_string(),
                    size.to_string(),
                    o.steps.to_string(),
                    o.guidance.to_string(),
                    o.threads.to_string(),
                    o.seed.to_string(),
                    image.display().to_string(),
                    o.dtype.clone(),
                ];
                let mut cmd = if sides[i] == "ours" {
                    let mut c = Command::new(&exe);
                    c.arg("child");
                    c
                } else {
                    let mut c = Command::new(&o.python);
                    c.arg(&script).arg("run");
                    c
                };
                cmd.args(&common);
                if sides[i] == "ours" {
                    cmd.arg(o.kernels);
                }
                eprintln!("{size}x{size} round {} {}...", round + 1, sides[i]);
                let run = run_side(sides[i], &mut cmd, &image)?;
                eprintln!(
                    "  {:.1} s cold, step {:.2} s, peak {:.2} GiB{}",
                    run.cold_s,
                    run.figures["step_s"].as_f64().unwrap_or(f64::NAN),
                    run.figures["peak_rss_mib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                    if run.disturbed { " (disturbed)" } else { "" }
                );
                runs[i].push(run);
            }
        }
        let disturbed = runs.iter().flatten().any(|r| r.disturbed);
        any_disturbed |= disturbed;
        println!();
        println!(
            "### {size}x{size}, {} steps{}",
            o.steps,
            if disturbed {
                " (FLAGGED: some runs started or ended on a busy machine)"
            } else {
                ""
            }
        );
        println!();
        print!("| | ours |");
        if !o.ours_only {
            print!(" diffusers | ours/diffusers |");
        }
        println!();
        println!("|---|---|{}", if o.ours_only { "" } else { "---|---|" });
        let rows: [(&str, &str, &str); 9] = [
            ("load", "load_s", "s"),
            ("text encode (both prompts, warm)", "encode_s", "s"),
            ("txt2img call to end of first step", "first_step_s", "s"),
            ("spawn to end of first step", "spawn_first", "s"),
            ("one step (UNet, CFG batch 2), median", "step_s", "s"),
            ("decode (last step to image)", "decode_s", "s"),
            ("txt2img call", "total_s", "s"),
            ("cold process, spawn to exit", "cold", "s"),
            ("peak RSS", "peak_rss_mib", "MiB"),
        ];
        for (label, key, unit) in rows {
            let med = |side: &[Run]| {
                median(
                    side.iter()
                        .map(|r| {
                            if key == "cold" {
                                r.cold_s
                            } else if key == "spawn_first" {
                                r.spawn_to_first_step_s
                            } else {
                                r.figures[key].as_f64().unwrap_or(f64::NAN)
                            }
                        })
                        .collect(),
                )
            };
            let ours = med(&runs[0]);
            print!("| {label} | {} |", fmt_value(ours, unit));
            if !o.ours_only {
                let theirs = med(&runs[1]);
                print!(" {} | {:.2}x |", fmt_value(theirs, unit), ours / theirs);
            }
            println!();
        }
        let ours_peak = median(
            runs[0]
                .iter()
                .map(|r| r.figures["peak_rss_mib"].as_f64().unwrap_or(f64::NAN))
                .collect(),
        );
        println!();
        println!(
            "peak RSS / weight bytes: ours {:.2}x",
            ours_peak * (1u64 << 20) as f64 / weight_bytes as f64
        );
        if !o.ours_only {
            if let (Some(a), Some(b)) = (runs[0].first(), runs[1].first()) {
                let max_diff = a
                    .image
                    .iter()
                    .zip(&b.image)
                    .map(|(x, y)| x.abs_diff(*y))
                    .max()
                    .unwrap_or(0);
                println!(
                    "images: {} bytes each, max difference {max_diff} levels{}",
                    a.image.len(),
                    if a.image.len() == b.image.len() {
                        ""
                    } else {
                        " (SIZES DIFFER)"
                    }
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!();
    println!(
        "load average at end {}{}",
        load_average(),
        if any_disturbed {
            "; FLAGGED runs: the machine was busy, the figures are not trustworthy"
        } else {
            "; no run was disturbed"
        }
    );
    Ok(())
}
