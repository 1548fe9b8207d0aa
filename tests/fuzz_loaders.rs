//! Seeded mutation fuzzing of the model loaders, run by `make test` with a fixed budget.
//!
//! Every case mutates one of the fixtures (a `.ckpt`, a single `.safetensors`, a diffusers
//! folder's JSON and text files) and loads the result through `StableDiffusion::load`, the path
//! every caller takes (SDXL single files through `load_with` and their folder as `config_dir`:
//! the tiny models' group norms are not SDXL's, so without it every case would stop at the
//! config). For each case: an error or a loaded model, never a panic; bounded time and
//! bounded peak RSS (reset before each case through /proc/self/clear_refs); and the file we were
//! given is byte for byte what it was. `SD_FUZZ_CASES` scales the number of cases (default
//! below); `SD_FUZZ_SEED` changes the seed.
mod common;

use common::{dtype_size, parse_safetensors, write_safetensors, Pick, Rng, StTensor};

use stable_diffusion::pipeline::{LoadOptions, StableDiffusion};
use stable_diffusion::weights::single_file::ModelOverrides;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Cases per mutation family when `SD_FUZZ_CASES` is unset.
const DEFAULT_CASES: usize = 400;
/// A load of these few-MB fixtures, hostile or not, may take this long at most (generous: the
/// machine may be busy with the rest of `make test`).
const TIME_BOUND: Duration = Duration::from_secs(20);
/// Peak RSS growth allowed for one load: the fixtures' models are under 30 MB in fp32.
const RSS_BOUND_KB: u64 = 384 << 10;

/// Loads done by all the families, for the summary line.
static CASES_RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Integers that break careless size arithmetic.
const HOSTILE_INTS: [i64; 16] = [
    0,
    -1,
    1,
    2,
    3,
    7,
    -(1 << 31),
    (1 << 31) - 1,
    1 << 24,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX,
    i64::MIN,
    4096,
    1_000_000_007,
];

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux >= 4.0), so a case's peak is its own.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

struct Tally {
    started: Instant,
    cases: usize,
    loaded: usize,
    errors: usize,
    slowest: Duration,
    max_rss_growth_kb: u64,
    messages: BTreeMap<String, usize>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            cases: 0,
            loaded: 0,
            errors: 0,
            slowest: Duration::ZERO,
            max_rss_growth_kb: 0,
            messages: BTreeMap::new(),
        }
    }
}

impl Tally {
    fn print(&self, family: &str) {
        println!(
            "fuzz {family}: {} cases in {:.0} s, {} loaded, {} refused; slowest {:.2} s, \
             largest peak RSS growth {} MiB",
            self.cases,
            self.started.elapsed().as_secs_f64(),
            self.loaded,
            self.errors,
            self.slowest.as_secs_f64(),
            self.max_rss_growth_kb >> 10
        );
        let mut common: Vec<_> = self.messages.iter().collect();
        common.sort_by(|a, b| b.1.cmp(a.1));
        for (m, n) in common.iter().take(6) {
            println!("    {n:5} x {m}");
        }
    }
}

/// Loads `path` once (with `config` as the single file's config folder) and checks every
/// promise; `files` are the files of the case with the bytes they must still have afterwards.
/// Returns a failure description instead of panicking.
fn check_load(
    path: &Path,
    config: Option<&Path>,
    files: &[(PathBuf, Vec<u8>)],
    what: &str,
    tally: &mut Tally,
) -> Option<String> {
    let can_measure = reset_peak_rss();
    let before = status_kb("VmRSS:");
    let start = Instant::now();
    let overrides = ModelOverrides {
        config_dir: config.map(Path::to_path_buf),
        ..Default::default()
    };
    let outcome = std::panic::catch_unwind(|| {
        StableDiffusion::load_with(path, &LoadOptions::default(), &overrides)
    });
    let elapsed = start.elapsed();
    let peak = status_kb("VmHWM:");
    tally.cases += 1;
    CASES_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tally.slowest = tally.slowest.max(elapsed);
    let growth = peak.saturating_sub(before);
    if can_measure {
        tally.max_rss_growth_kb = tally.max_rss_growth_kb.max(growth);
    }
    let result = match outcome {
        Err(_) => return Some(format!("{what}: the loader panicked")),
        Ok(r) => r,
    };
    match &result {
        Ok(_) => tally.loaded += 1,
        Err(e) => {
            tally.errors += 1;
            let msg = e.to_string();
            if msg.trim().is_empty() {
                return Some(format!("{what}: an error with an empty message"));
            }
            // Group messages by their first words for the summary.
            let head: String = msg
                .replace(|c: char| c.is_ascii_digit(), "#")
                .chars()
                .take(70)
                .collect();
            *tally.messages.entry(head).or_default() += 1;
        }
    }
    drop(result);
    if elapsed > TIME_BOUND {
        return Some(format!("{what}: took {:.1} s", elapsed.as_secs_f64()));
    }
    if can_measure && growth > RSS_BOUND_KB {
        return Some(format!("{what}: peak RSS grew by {} MiB", growth >> 10));
    }
    for (f, bytes) in files {
        match std::fs::read(f) {
            Ok(now) if &now == bytes => {}
            _ => return Some(format!("{what}: {} was modified by loading", f.display())),
        }
    }
    None
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn cases() -> usize {
    std::env::var("SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn seed() -> u64 {
    std::env::var("SD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d)
}

// ------------------------------------------------------------------------------------------
// Byte-level mutations
// ------------------------------------------------------------------------------------------

/// A position biased towards the structure of a file: its head (headers, `data.pkl`) and its
/// tail (the zip central directory), where a flipped byte changes what the loader believes.
fn structural_position(rng: &mut Rng, len: usize, head: usize) -> usize {
    match rng.below(10) {
        0..=4 => rng.below(head.min(len)),
        5..=8 => len - 1 - rng.below(4096.min(len)),
        _ => rng.below(len),
    }
}

fn mutate_bytes(rng: &mut Rng, original: &[u8], head: usize) -> (Vec<u8>, String) {
    let mut data = original.to_vec();
    let len = data.len();
    match rng.below(5) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let at = structural_position(rng, len, head);
                data[at] ^= 1 << rng.below(8);
            }
            (data, format!("{n} bit flips"))
        }
        1 => {
            let at = structural_position(rng, len, head);
            let n = (1 + rng.below(16)).min(len - at);
            let fill = *rng.pick(&[0x00u8, 0xff, 0x7f, 0x80]);
            data[at..at + n].fill(fill);
            (data, format!("{n} bytes at {at} set to {fill:#04x}"))
        }
        2 => {
            let at = if rng.below(2) == 0 {
                rng.below(len)
            } else {
                structural_position(rng, len, head)
            };
            data.truncate(at);
            (data, format!("truncated to {at} bytes"))
        }
        3 => {
            // A hostile little-endian integer over 4 or 8 bytes (sizes, offsets, counts).
            let at = structural_position(rng, len, head);
            let v = *rng.pick(&HOSTILE_INTS);
            let bytes = v.to_le_bytes();
            let n = if rng.below(2) == 0 { 4 } else { 8 }.min(len - at);
            data[at..at + n].copy_from_slice(&bytes[..n]);
            (data, format!("{v} written at {at}"))
        }
        _ => {
            // Digits in text headers: a number becomes a hostile one.
            let digits: Vec<usize> = (0..head.min(len))
                .filter(|&i| data[i].is_ascii_digit())
                .collect();
            if digits.is_empty() {
                return (data, "unchanged".into());
            }
            let at = *rng.pick(&digits);
            let v = rng.pick(&HOSTILE_INTS).to_string();
            let mut out = data[..at].to_vec();
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(&data[at + 1..]);
            (out, format!("digit at {at} replaced by {v}"))
        }
    }
}

fn fuzz_file_bytes(
    rng: &mut Rng,
    base: &Path,
    config: Option<&Path>,
    head: usize,
    n: usize,
    failures: &mut Vec<String>,
) {
    let original = std::fs::read(base).unwrap();
    let dir = scratch(&format!(
        "bytes-{}",
        base.file_stem().unwrap().to_string_lossy()
    ));
    let ext = base.extension().unwrap().to_string_lossy().into_owned();
    let path = dir.join(format!("case.{ext}"));
    let mut tally = Tally::default();
    for i in 0..n {
        let (data, how) = mutate_bytes(rng, &original, head);
        std::fs::write(&path, &data).unwrap();
        let what = format!("{} case {i} ({how})", base.display());
        if let Some(f) = check_load(&path, config, &[(path.clone(), data)], &what, &mut tally) {
            failures.push(f);
        }
    }
    tally.print(&format!(
        "bytes of {}",
        base.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------------------------
// Structured mutations: JSON (safetensors headers, configs) and pickles
// ------------------------------------------------------------------------------------------

/// A hostile JSON value.
fn hostile_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(12) {
        0..=4 => json!(*rng.pick(&HOSTILE_INTS)),
        5 => json!(u64::MAX),
        6 => json!(*rng.pick(&[1e308, -1e308, 0.5, -0.0, 1e-320])),
        7 => json!(*rng.pick(&[
            "",
            "NaN",
            "Infinity",
            "F8_E4M3",
            "a",
            "UNetMidBlock2DCrossAttn"
        ])),
        8 => json!([]),
        9 => json!({}),
        10 => serde_json::Value::Null,
        _ => json!(vec![*rng.pick(&HOSTILE_INTS); 1 + rng.below(6)]),
    }
}

/// Replaces one randomly chosen value (any depth) of `v` with `new`; returns its path.
fn replace_random(rng: &mut Rng, v: &mut serde_json::Value, new: serde_json::Value) -> String {
    fn count(v: &serde_json::Value) -> usize {
        1 + match v {
            serde_json::Value::Array(a) => a.iter().map(count).sum(),
            serde_json::Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn nth<'a>(
        v: &'a mut serde_json::Value,
        n: &mut usize,
        path: &mut String,
    ) -> Option<&'a mut serde_json::Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    if let Some(found) = nth(x, n, path) {
                        return Some(found);
                    }
                    path.truncate(len);
                }
                None
            }
            serde_json::Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    let len = path.len();
                    path.push_str(&format!(".{k}"));
                    if let Some(found) = nth(x, n, path) {
                        return Some(found);
                    }
                    path.truncate(len);
                }
                None
            }
            _ => None,
        }
    }
    let total = count(v);
    // Skip the root most of the time: replacing a whole file is the least interesting case.
    let mut n = if total > 1 {
        1 + rng.below(total - 1)
    } else {
        0
    };
    let mut path = String::new();
    if let Some(slot) = nth(v, &mut n, &mut path) {
        *slot = new;
    }
    path
}

/// A safetensors file whose JSON header has one value replaced by a hostile one (data kept).
fn mutate_safetensors_header(rng: &mut Rng, original: &[u8]) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&original[8..8 + n]).unwrap();
    let new = hostile_json(rng);
    let shown = new.to_string();
    // Mostly shapes and offsets: pick a tensor and one of its numbers.
    let path = if rng.below(4) != 0 {
        let names: Vec<String> = header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        let name = rng.pick(&names).clone();
        let field = *rng.pick(&["shape", "data_offsets", "dtype"]);
        let entry = &mut header[&name][field];
        match entry {
            serde_json::Value::Array(a) if !a.is_empty() && rng.below(3) != 0 => {
                let i = rng.below(a.len());
                a[i] = new;
                format!("{name}.{field}[{i}]")
            }
            _ => {
                *entry = new;
                format!("{name}.{field}")
            }
        }
    } else {
        replace_random(rng, &mut header, new)
    };
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&original[8 + n..]);
    (out, format!("header {path} = {shown}"))
}

/// A valid safetensors file whose tensors say something hostile: a shape with a zero and a huge
/// dimension (no data, yet a config could be inferred from it), a reshaped or resized tensor,
/// another dtype, a tensor dropped or copied under another key. Sizes stay consistent, so the
/// file passes the format's own checks and reaches the model code.
fn mutate_safetensors_semantics(rng: &mut Rng, original: &[StTensor]) -> (Vec<u8>, String) {
    let mut tensors = original.to_vec();
    let i = rng.below(tensors.len());
    let (name, dtype, shape, bytes) = tensors[i].clone();
    let elt = dtype_size(&dtype);
    let how = match rng.below(6) {
        0 => {
            let huge = *rng.pick(&[1u64 << 24, 1 << 40, 1 << 62, u64::MAX, 3]);
            let mut s = shape.clone();
            if s.is_empty() {
                s.push(0);
            }
            let at = rng.below(s.len());
            s[at] = 0;
            s.push(huge);
            tensors[i] = (name.clone(), dtype, s.clone(), Vec::new());
            format!("{name} shape {s:?}, no data")
        }
        1 => {
            let numel: u64 = shape.iter().product();
            let s = match rng.below(3) {
                0 => vec![numel],
                1 => vec![1, numel],
                _ => shape.iter().rev().copied().collect(),
            };
            tensors[i] = (name.clone(), dtype, s.clone(), bytes);
            format!("{name} reshaped to {s:?}")
        }
        2 => {
            let mut s = shape.clone();
            if s.is_empty() {
                s.push(1);
            }
            let at = rng.below(s.len());
            let factor = *rng.pick(&[2u64, 3, 8]);
            s[at] = if rng.below(2) == 0 {
                s[at] * factor
            } else {
                s[at] / factor
            };
            let numel: u64 = s.iter().product();
            let mut b = bytes.clone();
            b.resize(numel as usize * elt, 0x3c);
            tensors[i] = (name.clone(), dtype, s.clone(), b);
            format!("{name} resized to {s:?}")
        }
        3 => {
            let new = *rng.pick(&["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "I8"]);
            let numel: usize = shape.iter().product::<u64>() as usize;
            let mut b = bytes.clone();
            b.resize(numel * dtype_size(new), 0);
            tensors[i] = (name.clone(), new.to_string(), shape.clone(), b);
            format!("{name} as {new}")
        }
        4 => {
            tensors.remove(i);
            format!("{name} removed")
        }
        _ => {
            let key = rng
                .pick(&[
                    "model_ema.diffusion_modelinput_blocks00weight",
                    "conditioner.embedders.1.model.ln_final.weight",
                    "model.diffusion_model.joint_blocks.0.x",
                    "model.diffusion_model.input_blocks.99.0.op.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.99.self_attn.q_proj.weight",
                    "first_stage_model.encoder.down.9.block.0.conv2.weight",
                    "model.diffusion_model.label_emb.0.0.weight",
                    "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.attn1.to_q.weight",
                    "conditioner.embedders.0.model.token_embedding.weight",
                    "conditioner.embedders.1.model.text_projection",
                    "v_pred",
                ])
                .to_string();
            tensors.push((key.clone(), dtype, shape, bytes));
            format!("{name} copied as {key}")
        }
    };
    (write_safetensors(&tensors), how)
}

fn fuzz_safetensors_semantics(
    rng: &mut Rng,
    base: &Path,
    config: Option<&Path>,
    n: usize,
    failures: &mut Vec<String>,
) {
    let original = parse_safetensors(&std::fs::read(base).unwrap());
    let dir = scratch("st-semantics");
    let path = dir.join("case.safetensors");
    let mut tally = Tally::default();
    for i in 0..n {
        let (data, how) = mutate_safetensors_semantics(rng, &original);
        std::fs::write(&path, &data).unwrap();
        let what = format!("{} case {i} ({how})", base.display());
        if let Some(f) = check_load(&path, config, &[(path.clone(), data)], &what, &mut tally) {
            failures.push(f);
        }
    }
    let name = base.file_name().unwrap().to_string_lossy();
    let with = if config.is_some() { ", config_dir" } else { "" };
    tally.print(&format!("tensors of {name}{with}"));
    let _ = std::fs::remove_dir_all(dir);
}

fn fuzz_safetensors_headers(
    rng: &mut Rng,
    base: &Path,
    config: Option<&Path>,
    n: usize,
    failures: &mut Vec<String>,
) {
    let original = std::fs::read(base).unwrap();
    let dir = scratch("st-header");
    let path = dir.join("case.safetensors");
    let mut tally = Tally::default();
    for i in 0..n {
        let (data, how) = mutate_safetensors_header(rng, &original);
        std::fs::write(&path, &data).unwrap();
        let what = format!("{} case {i} ({how})", base.display());
        if let Some(f) = check_load(&path, config, &[(path.clone(), data)], &what, &mut tally) {
            failures.push(f);
        }
    }
    tally.print(&format!(
        "safetensors header of {}",
        base.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// The zip entries of a `.ckpt`, in order.
fn read_zip(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let file = std::fs::File::open(path).unwrap();
    let mut archive = zip::ZipArchive::new(file).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().to_string(), data)
        })
        .collect()
}

/// Writes entries as a PyTorch-style zip (stored; `compress` deflates the named ones).
fn write_zip(path: &Path, entries: &[(String, Vec<u8>)], compress: &[&str]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = zip::ZipWriter::new(file);
    for (name, data) in entries {
        let method = if compress.iter().any(|c| name.ends_with(c)) {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::FileOptions::default()
            .compression_method(method)
            .large_file(data.len() as u64 >= u32::MAX as u64);
        w.start_file(name.as_str(), options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

/// Byte length of the argument of each pickle opcode that torch.save writes (protocol 2),
/// `None` for opcodes with a text or length-prefixed argument handled in [`walk_pickle`].
fn fixed_arg(op: u8) -> Option<usize> {
    Some(match op {
        b'K' | b'q' | b'h' | 0x80 => 1,
        b'M' => 2,
        b'J' | b'r' | b'j' => 4,
        b'G' | 0x95 => 8,
        b'}' | b'(' | b't' | 0x85 | 0x86 | 0x87 | b'Q' | b'R' | b'b' | b'u' | b's' | b']'
        | b'e' | b'a' | b')' | b'N' | 0x88 | 0x89 | b'.' | 0x94 | 0x93 | b'0' | b'l' | b'd' => 0,
        _ => return None,
    })
}

/// The positions of the integer opcodes (`K`, `M`, `J`, `LONG1`) of a pickle, with their
/// length in bytes including the opcode; `None` when the walk meets an opcode it doesn't know.
fn walk_pickle(p: &[u8]) -> Option<Vec<(usize, usize)>> {
    let mut ints = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let op = p[i];
        let arg = match op {
            b'X' => 4 + u32::from_le_bytes(p.get(i + 1..i + 5)?.try_into().ok()?) as usize,
            0x8c => 1 + *p.get(i + 1)? as usize,
            0x8a => 1 + *p.get(i + 1)? as usize,
            b'c' => {
                let first = p[i + 1..].iter().position(|&b| b == b'\n')?;
                let second = p[i + 2 + first..].iter().position(|&b| b == b'\n')?;
                first + second + 2
            }
            other => fixed_arg(other)?,
        };
        if matches!(op, b'K' | b'M' | b'J' | 0x8a) {
            ints.push((i, 1 + arg));
        }
        if op == b'.' {
            break;
        }
        i += 1 + arg;
    }
    Some(ints)
}

fn long1(v: i64) -> Vec<u8> {
    let mut out = vec![0x8a, 8];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

/// A `data.pkl` with hostile content: an integer (size, stride, offset, numel) replaced, or a
/// nesting, stack or memo bomb spliced in before the final STOP.
fn mutate_pickle(rng: &mut Rng, pkl: &[u8], ints: &[(usize, usize)]) -> (Vec<u8>, String) {
    let splice = |insert: &[u8]| -> Vec<u8> {
        // Inserted right after PROTO, leaving the stack as it was: `0` pops what was pushed.
        let mut out = pkl[..2].to_vec();
        out.extend_from_slice(insert);
        out.extend_from_slice(&pkl[2..]);
        out
    };
    match rng.below(9) {
        0..=4 => {
            let &(at, len) = rng.pick(ints);
            let v = *rng.pick(&HOSTILE_INTS);
            let mut out = pkl[..at].to_vec();
            out.extend_from_slice(&long1(v));
            out.extend_from_slice(&pkl[at + len..]);
            (out, format!("integer at {at} set to {v}"))
        }
        5 => {
            let depth = *rng.pick(&[500usize, 5_000, 200_000]);
            let mut bomb = vec![b'('; depth];
            bomb.extend(std::iter::repeat(b'l').take(depth));
            bomb.push(b'0');
            (splice(&bomb), format!("lists nested {depth} deep"))
        }
        6 => {
            let n = *rng.pick(&[10_000usize, 2_000_000]);
            let mut bomb = vec![b'N'; n];
            bomb.extend(std::iter::repeat(b'0').take(n));
            (splice(&bomb), format!("{n} values on the stack"))
        }
        7 => {
            // One memoised list of pairs turned into an OrderedDict over and over: each REDUCE
            // that copied the list would cost its length again.
            let (pairs, times) = *rng.pick(&[(1_000usize, 100usize), (20_000, 5_000)]);
            let mut bomb = b"ccollections\nOrderedDict\nr".to_vec();
            bomb.extend_from_slice(&0x00ff_0001u32.to_le_bytes());
            bomb.push(b'0');
            bomb.push(b'(');
            for _ in 0..pairs {
                bomb.extend_from_slice(&[b'K', 1, b'K', 2, 0x86]);
            }
            bomb.push(b'l');
            bomb.push(b'r');
            bomb.extend_from_slice(&0x00ff_0002u32.to_le_bytes());
            bomb.push(b'0');
            for _ in 0..times {
                bomb.push(b'j');
                bomb.extend_from_slice(&0x00ff_0001u32.to_le_bytes());
                bomb.push(b'j');
                bomb.extend_from_slice(&0x00ff_0002u32.to_le_bytes());
                bomb.extend_from_slice(&[0x85, b'R']);
            }
            (
                splice(&bomb),
                format!("{times} OrderedDicts of one {pairs}-pair list"),
            )
        }
        _ => {
            // A list memoised, then re-fetched and appended to itself over and over.
            let n = *rng.pick(&[1_000usize, 100_000]);
            let mut bomb = vec![b']', b'r'];
            bomb.extend_from_slice(&0x00ff_0000u32.to_le_bytes());
            for _ in 0..n {
                bomb.push(b'j');
                bomb.extend_from_slice(&0x00ff_0000u32.to_le_bytes());
                bomb.push(b'a');
            }
            bomb.push(b'0');
            (
                splice(&bomb),
                format!("a memoised list appended to {n} times"),
            )
        }
    }
}

fn fuzz_ckpt_pickles(
    rng: &mut Rng,
    base: &Path,
    config: Option<&Path>,
    n: usize,
    failures: &mut Vec<String>,
) {
    let entries = read_zip(base);
    let pkl_index = entries
        .iter()
        .position(|(name, _)| name.ends_with("data.pkl"))
        .unwrap();
    let pkl = entries[pkl_index].1.clone();
    let ints = walk_pickle(&pkl).expect("the fixture's pickle uses known opcodes");
    assert!(
        ints.len() > 100,
        "found only {} integers in the fixture's pickle",
        ints.len()
    );
    let dir = scratch("ckpt-pickle");
    let path = dir.join("case.ckpt");
    let mut tally = Tally::default();
    for i in 0..n {
        let (new_pkl, how) = mutate_pickle(rng, &pkl, &ints);
        let mut case = entries.clone();
        case[pkl_index].1 = new_pkl;
        // Some cases deflate data.pkl and the storages (torch.save writes them stored, other
        // writers compress).
        let compress: &[&str] = if rng.below(4) == 0 {
            &["data.pkl", ""]
        } else {
            &[]
        };
        write_zip(&path, &case, compress);
        let data = std::fs::read(&path).unwrap();
        let what = format!(
            "{} case {i} ({how}{})",
            base.display(),
            if compress.is_empty() {
                ""
            } else {
                ", deflated"
            }
        );
        if let Some(f) = check_load(&path, config, &[(path.clone(), data)], &what, &mut tally) {
            failures.push(f);
        }
    }
    tally.print(&format!(
        "pickle of {}",
        base.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// A diffusers folder whose weights are hard links to the fixture's and whose JSON / text files
/// are copies, one of them mutated per case.
fn fuzz_folder_configs(rng: &mut Rng, base: &Path, n: usize, failures: &mut Vec<String>) {
    let dir = scratch("folder");
    let mut texts: Vec<PathBuf> = Vec::new();
    let mut weights: Vec<PathBuf> = Vec::new();
    for entry in walk(base) {
        let rel = entry.strip_prefix(base).unwrap().to_path_buf();
        if entry.extension().is_some_and(|e| e == "safetensors") {
            weights.push(rel);
        } else {
            texts.push(rel);
        }
    }
    texts.sort();
    let mut tally = Tally::default();
    for i in 0..n {
        let case = dir.join(format!("case{}", i % 2));
        let _ = std::fs::remove_dir_all(&case);
        let mut files = Vec::new();
        for rel in &weights {
            let to = case.join(rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::hard_link(base.join(rel), &to)
                .or_else(|_| std::fs::copy(base.join(rel), &to).map(|_| ()))
                .unwrap();
        }
        let target = rng.pick(&texts).clone();
        let mut how = String::new();
        for rel in &texts {
            let to = case.join(rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            let mut data = std::fs::read(base.join(rel)).unwrap();
            if *rel == target {
                let json = rel.extension().is_some_and(|e| e == "json");
                let parsed: Option<serde_json::Value> = if json {
                    serde_json::from_slice(&data).ok()
                } else {
                    None
                };
                match parsed {
                    Some(mut v) if rng.below(4) != 0 => {
                        let new = if rng.below(8) == 0 {
                            // Deep nesting, past serde_json's recursion limit.
                            let depth = 100_000;
                            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                            serde_json::Value::String(text)
                        } else {
                            hostile_json(rng)
                        };
                        let shown: String = new.to_string().chars().take(40).collect();
                        let path = replace_random(rng, &mut v, new);
                        // Deep nesting goes in as raw text, not as a quoted string.
                        let mut text = serde_json::to_string(&v).unwrap();
                        if shown.starts_with("\"[[[") {
                            let depth = 100_000;
                            let quoted = serde_json::to_string(&format!(
                                "{}{}",
                                "[".repeat(depth),
                                "]".repeat(depth)
                            ))
                            .unwrap();
                            text = text.replacen(
                                &quoted,
                                &format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                                1,
                            );
                        }
                        data = text.into_bytes();
                        how = format!("{}: {path} = {shown}", rel.display());
                    }
                    _ => {
                        let (d, h) = mutate_bytes(rng, &data, data.len());
                        data = d;
                        how = format!("{}: {h}", rel.display());
                    }
                }
            }
            std::fs::write(&to, &data).unwrap();
            files.push((to, data));
        }
        for rel in &weights {
            files.push((case.join(rel), std::fs::read(base.join(rel)).unwrap()));
        }
        let what = format!("{} case {i} ({how})", base.display());
        if let Some(f) = check_load(&case, None, &files, &what, &mut tally) {
            failures.push(f);
        }
    }
    tally.print(&format!(
        "configs of {}",
        base.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(dir);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn fuzz_loaders() {
    let n = cases();
    let mut rng = Rng::new(seed());
    let single = common::fixtures().join("single");
    let mut failures = Vec::new();
    let start = Instant::now();

    // The unmutated fixtures load, and set the scale of a normal load.
    let mut tally = Tally::default();
    for base in [
        "tiny-sd1.ckpt",
        "tiny-sd1.safetensors",
        "tiny-sd2.safetensors",
    ] {
        let path = single.join(base);
        let bytes = std::fs::read(&path).unwrap();
        assert!(check_load(&path, None, &[(path.clone(), bytes)], base, &mut tally).is_none());
    }
    let sdxl = common::fixtures().join("tiny-sdxl");
    let refiner = common::fixtures().join("tiny-sdxl-refiner");
    let sdxl_files = [
        ("tiny-sdxl.safetensors", &sdxl),
        ("tiny-sdxl-refiner.safetensors", &refiner),
        ("tiny-sdxl-refiner-bf16.safetensors", &refiner),
        ("tiny-sdxl-refiner.ckpt", &refiner),
    ];
    for (base, config) in sdxl_files {
        let path = single.join(base);
        let bytes = std::fs::read(&path).unwrap();
        let r = check_load(
            &path,
            Some(config),
            &[(path.clone(), bytes)],
            base,
            &mut tally,
        );
        assert!(r.is_none(), "{r:?}");
    }
    assert_eq!(tally.loaded, 7, "the fixtures themselves must load");
    tally.print("unmutated fixtures");

    let sd1_ckpt = single.join("tiny-sd1.ckpt");
    let sd1 = single.join("tiny-sd1.safetensors");
    let sd2 = single.join("tiny-sd2.safetensors");
    let folder = common::fixtures().join("tiny-sd1");
    fuzz_ckpt_pickles(&mut rng, &sd1_ckpt, None, n, &mut failures);
    fuzz_file_bytes(&mut rng, &sd1_ckpt, None, 80 << 10, n, &mut failures);
    fuzz_safetensors_semantics(&mut rng, &sd1, None, n, &mut failures);
    fuzz_safetensors_semantics(&mut rng, &sd2, None, n / 2, &mut failures);
    fuzz_safetensors_headers(&mut rng, &sd1, None, n / 2, &mut failures);
    fuzz_safetensors_headers(&mut rng, &sd2, None, n / 4, &mut failures);
    fuzz_file_bytes(&mut rng, &sd2, None, 64 << 10, n / 2, &mut failures);
    // SDXL single files: both encoders (bigG's fused in_proj and transposed projection),
    // label_emb, bf16 and the .ckpt reader on an SDXL state dict; with their folders as
    // config_dir (cases reach the tensors), and without it for detection and inference.
    let sdxl_st = single.join("tiny-sdxl.safetensors");
    let refiner_st = single.join("tiny-sdxl-refiner.safetensors");
    let refiner_bf16 = single.join("tiny-sdxl-refiner-bf16.safetensors");
    let refiner_ckpt = single.join("tiny-sdxl-refiner.ckpt");
    fuzz_safetensors_semantics(&mut rng, &sdxl_st, Some(&sdxl), n / 2, &mut failures);
    fuzz_safetensors_semantics(&mut rng, &sdxl_st, None, n / 4, &mut failures);
    fuzz_safetensors_semantics(
        &mut rng,
        &refiner_bf16,
        Some(&refiner),
        n / 4,
        &mut failures,
    );
    fuzz_safetensors_headers(&mut rng, &refiner_st, Some(&refiner), n / 4, &mut failures);
    fuzz_ckpt_pickles(
        &mut rng,
        &refiner_ckpt,
        Some(&refiner),
        n / 2,
        &mut failures,
    );
    fuzz_file_bytes(
        &mut rng,
        &refiner_ckpt,
        Some(&refiner),
        64 << 10,
        n / 4,
        &mut failures,
    );
    fuzz_folder_configs(&mut rng, &folder, n, &mut failures);
    // SDXL folders: model_index.json, both encoders' and tokenizers' files, the text_time UNet.
    fuzz_folder_configs(
        &mut rng,
        &common::fixtures().join("tiny-sdxl"),
        n / 2,
        &mut failures,
    );
    fuzz_folder_configs(
        &mut rng,
        &common::fixtures().join("tiny-sdxl-refiner"),
        n / 4,
        &mut failures,
    );

    println!(
        "fuzz: {} cases, {} failures, {:.0} s in all",
        CASES_RUN.load(std::sync::atomic::Ordering::Relaxed),
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        for f in failures.iter().take(30) {
            println!("FAILED {f}");
        }
        panic!(
            "{} fuzz cases broke a promise (first: {})",
            failures.len(),
            failures[0]
        );
    }
}
