//! Helpers shared by the parity tests: fixture paths and tensor comparisons.
#![allow(dead_code)]
use stable_diffusion::rng::{GlobalNoise, NoiseSource};
use stable_diffusion::schedulers::SchedulerConfig;
use stable_diffusion::weights::SafetensorsFile;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Standard normal test inputs, drawn holding the library's generator lock: an unlocked draw on
/// another test thread could land between a seeded pipeline's `manual_seed` and its own draws
/// and change that pipeline's noise.
pub fn locked_randn(shape: &[i64]) -> Tensor {
    let _guard = stable_diffusion::rng::GLOBAL_RNG.lock();
    Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
}

/// Uniform [0, 1) test inputs, drawn holding the library's generator lock (see [`locked_randn`]).
pub fn locked_rand(shape: &[i64]) -> Tensor {
    let _guard = stable_diffusion::rng::GLOBAL_RNG.lock();
    Tensor::rand(shape, (Kind::Float, tch::Device::Cpu))
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub struct Refs {
    file: SafetensorsFile,
}

impl Refs {
    pub fn open(model: &str) -> Self {
        let path = fixtures().join(format!("{model}-refs.safetensors"));
        Self {
            file: SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.file.tensor(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.info(name).is_some()
    }
}

/// Copies the folder `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn cases(model: &str) -> serde_json::Value {
    let path = fixtures().join(format!("{model}-cases.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes non-finite floats (e.g. DPM's lambda_min_clipped) as bare words.
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The case called `name` in the `group` list of `<set>-cases.json`.
pub fn case_named(set: &str, group: &str, name: &str) -> serde_json::Value {
    cases(set)[group]
        .as_array()
        .unwrap_or_else(|| panic!("{set}: no {group} list"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{set}: no {group} case {name}"))
        .clone()
}

/// The fixture model folder `name`, loaded with the default options.
pub fn load_model(name: &str) -> stable_diffusion::pipeline::StableDiffusion {
    stable_diffusion::pipeline::StableDiffusion::load(
        &fixtures().join(name),
        &stable_diffusion::pipeline::LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A fixture case's request: prompt, negative prompt, steps, guidance, seed, size, batch,
/// scheduler, and `clip_skip` / `eta` where the case has them.
pub fn case_params(case: &serde_json::Value) -> stable_diffusion::pipeline::GenerateParams {
    stable_diffusion::pipeline::GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        width: case["width"].as_i64(),
        height: case["height"].as_i64(),
        batch: case["batch"].as_u64().unwrap_or(1) as usize,
        scheduler: case["scheduler"].as_str().map(String::from),
        clip_skip: case["clip_skip"].as_u64().unwrap_or(0) as usize,
        eta: case["eta"].as_f64().unwrap_or(0.0),
        ..Default::default()
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (a - b).abs().max().double_value(&[])
}

/// Asserts `max |actual - expected| <= tol`, naming what was compared.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let err = max_abs_diff(actual, expected);
    let scale = expected.to_kind(Kind::Double).abs().max().double_value(&[]);
    eprintln!("{what}: max abs error {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
    // A comparison against an all-zero reference would prove little.
    assert!(scale > 0.0, "{what}: reference is all zeros");
}

/// `tests/fixtures/<set>`: one scheduler fixture set (`cases.json`, `cases.safetensors`).
pub fn scheduler_fixture_dir(set: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
}

/// The `cases.json` of a scheduler fixture set.
pub fn scheduler_cases(set: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(scheduler_fixture_dir(set).join("cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("cases.json parses")
}

/// The tensors of a scheduler fixture set, by name.
pub fn scheduler_tensors(set: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(scheduler_fixture_dir(set).join("cases.safetensors"))
        .expect("cases.safetensors")
        .into_iter()
        .collect()
}

/// The `"config"` member of a fixture case as a scheduler config.
pub fn config_of(case: &serde_json::Value) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&case["config"].to_string()).expect("fixture config parses")
}

/// A JSON array of numbers.
pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// max|a − b| / max|b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Counts the draws and forwards them to the global generator.
pub struct CountingNoise {
    pub draws: usize,
}

impl NoiseSource for CountingNoise {
    fn randn(&mut self, shape: &[i64]) -> stable_diffusion::Result<Tensor> {
        self.draws += 1;
        GlobalNoise.randn(shape)
    }
}

/// The message of an error (panics on success).
pub fn err_text<T>(r: stable_diffusion::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `msg` mentions every one of `parts`.
pub fn contains_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} should mention {p:?}");
    }
}

/// The crate's seeded SplitMix64 (the training data set's), for the tests' seeded loops.
pub use stable_diffusion::train::dataset::Rng;

/// A random element of a slice, for the seeded loops.
pub trait Pick {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Pick for Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One tensor of a safetensors file: name, dtype, shape, bytes.
pub type StTensor = (String, String, Vec<u64>, Vec<u8>);

pub fn parse_safetensors(data: &[u8]) -> Vec<StTensor> {
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let mut out = Vec::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let offsets: Vec<usize> = info["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let shape = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let bytes = data[8 + n + offsets[0]..8 + n + offsets[1]].to_vec();
        let dtype = info["dtype"].as_str().unwrap().to_string();
        out.push((name.clone(), dtype, shape, bytes));
    }
    out
}

/// A well-formed safetensors file (offsets contiguous, sizes consistent) of `tensors`.
pub fn write_safetensors(tensors: &[StTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let end = offset + bytes.len();
        let info =
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]});
        header.insert(name.clone(), info);
        offset = end;
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

pub fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// A random small but valid UNet config: levels, widths, heads, depths, projections vary.
pub fn random_unet(rng: &mut Rng) -> serde_json::Value {
    let levels = 1 + rng.below(3);
    let base = 8 * (1 + rng.below(3) as i64);
    let channels: Vec<i64> = (0..levels).map(|i| base * (1 + i as i64)).collect();
    let attention: Vec<bool> = (0..levels).map(|_| rng.below(2) == 0).collect();
    let down: Vec<&str> = attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    serde_json::json!({
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": 1 + (rng.below(2) as u64),
        "transformer_layers_per_block": 1 + (rng.below(2) as u64),
        "attention_head_dim": *rng.pick(&[1, 2, 8]),
        "cross_attention_dim": *rng.pick(&[16, 24, 32]),
        "norm_num_groups": 8,
        "in_channels": *rng.pick(&[4, 9]),
        "out_channels": 4,
        "use_linear_projection": rng.below(2) == 0,
        "sample_size": 8,
    })
}

/// Runs txt2img and checks it against a fixture case: the timesteps the step callback saw
/// equal the case's `timesteps`, and the image is within 1e-3 of `refs`' `pipe_<name>`.
pub fn check_txt2img_case(
    what: &str,
    sd: &stable_diffusion::pipeline::StableDiffusion,
    params: &stable_diffusion::pipeline::GenerateParams,
    case: &serde_json::Value,
    refs: &Refs,
) {
    use stable_diffusion::pipeline::{Control, StepInfo};
    let mut seen = Vec::new();
    let mut on_step = |info: &StepInfo| {
        seen.push(info.timestep);
        Control::Continue
    };
    let images = sd
        .txt2img(params, Some(&mut on_step))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        seen,
        f64s(&case["timesteps"]),
        "{what}: timesteps seen by the callback"
    );
    let name = case["name"].as_str().unwrap();
    assert_close(
        what,
        &images.pixels,
        &refs.get(&format!("pipe_{name}")),
        1e-3,
    );
}

/// A uint8 `[H, W, 3]` reference tensor as an [`Image`](stable_diffusion::image_io::Image).
pub fn image_of(t: &Tensor) -> stable_diffusion::image_io::Image {
    let size = t.size();
    assert_eq!(size.len(), 3, "image tensor shape {size:?}");
    assert_eq!(size[2], 3);
    assert_eq!(t.kind(), tch::Kind::Uint8);
    let rgb = Vec::<u8>::try_from(t.reshape([-1])).unwrap();
    stable_diffusion::image_io::Image::new(size[1] as u32, size[0] as u32, rgb).unwrap()
}
