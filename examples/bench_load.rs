//! Load time and peak RSS of a single-file checkpoint of SD 1.5's size, with random weights.
//!
//!     cargo run --example bench_load [-- DIR]
//!     cargo run --example bench_load -- --sdxl [DIR]
//!
//! With `--sdxl`: an SDXL base file instead (`DIR/sdxl-random-fp16.safetensors`, about 6.9 GB,
//! Stability's layout: UNet with `label_emb`, VAE, CLIP-L and OpenCLIP bigG with fused
//! `in_proj` and a `[width, proj]` projection; 3.5 G parameters), written one tensor at a time
//! (the models are built without initialising their memory, so writing holds one tensor), and
//! loaded in bf16 only (fp32 would hold 13 GiB).
//!
//! Writes `DIR/sd15-random-fp16.safetensors` (default DIR: the system temp folder; about
//! 2.1 GB, kept for the next run) in the original CompVis layout: SD 1.5's UNet, VAE and CLIP
//! ViT-L text encoder, 1.07 G parameters in float16. Then, for each dtype (fp32, bf16) a fresh
//! child process loads it on the CPU with `StableDiffusion::load` and reports the wall time and
//! its peak RSS (`VmHWM` of /proc/self/status), next to the weights' own size in that dtype.
//! Not part of the test suite.
use stable_diffusion::models::{
    AutoencoderKL, ClipTextConfig, ClipTextTransformer, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use stable_diffusion::pipeline::{LoadOptions, StableDiffusion};
use stable_diffusion::weights::single_file::{
    text_original, vae_original, TextLayout, Transform, UNetMap,
};
use stable_diffusion::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const SD15_UNET: &str = r#"{
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
  "sample_size": 64
}"#;
const SD15_VAE: &str = r#"{
  "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                       "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                     "UpDecoderBlock2D"]
}"#;
const SD15_TEXT: &str = r#"{
  "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
  "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"
}"#;

/// stable-diffusion-xl-base-1.0's UNet.
const SDXL_UNET: &str = r#"{
  "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "use_linear_projection": true
}"#;
/// stable-diffusion-xl-base-1.0's `text_encoder_2`: OpenCLIP ViT-bigG/14 with projection.
const SDXL_TEXT_2: &str = r#"{
  "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
  "projection_dim": 1280, "architectures": ["CLIPTextModelWithProjection"]
}"#;

fn status_kib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn gib(kib: f64) -> f64 {
    kib / (1024.0 * 1024.0)
}

fn json<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_json::from_str(s).expect("embedded config")
}

/// One tensor to write: original key, shape, and its float16 bytes.
struct Entry {
    key: String,
    shape: Vec<i64>,
    bytes: Vec<u8>,
}

fn fp16_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Half).contiguous();
    let n = t.numel();
    let mut out = vec![0u8; n * 2];
    t.copy_data_u8(&mut out, n);
    out
}

/// Random float16 weights for every variable of `vs`, under the original key `key_of` gives.
fn entries_of(vs: &VarStore, key_of: impl Fn(&str, &[i64]) -> (String, Vec<i64>)) -> Vec<Entry> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .map(|(name, t)| {
            let (key, shape) = key_of(&name, &t.size());
            // Small random values: what matters here is size, not content.
            let data = t.f_mul_scalar(0.5).unwrap();
            Entry {
                key,
                shape,
                bytes: fp16_bytes(&data),
            }
        })
        .collect()
}

/// Writes a safetensors file entry by entry (the header first, then each tensor's bytes).
fn write_file(path: &Path, parts: Vec<Vec<Entry>>) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let all: Vec<&Entry> = parts.iter().flatten().collect();
    for e in &all {
        let end = offset + e.bytes.len();
        header.insert(
            e.key.clone(),
            serde_json::json!({"dtype": "F16", "shape": e.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    write_safetensors(path, header, "random weights, SD 1.5 sizes", offset, |w| {
        for e in &all {
            w.write_all(&e.bytes)?;
        }
        Ok(())
    })
}

/// Writes a float16 safetensors file from its tensor entries (`header`, `data_len` bytes of
/// data in all) and `write_data`, through a `.partial` file renamed at the end; returns its size.
fn write_safetensors(
    path: &Path,
    mut header: serde_json::Map<String, serde_json::Value>,
    note: &str,
    data_len: usize,
    write_data: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<u64> {
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "note": note}),
    );
    let mut text = serde_json::to_string(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(text.as_bytes()))
        .and_then(|()| write_data(&mut w))
        .and_then(|()| w.flush())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok((8 + text.len() + data_len) as u64)
}

/// Builds each SD 1.5 component with random init (one at a time) and writes the file.
fn make_checkpoint(path: &Path) -> Result<u64> {
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let mut parts = Vec::new();

    let cfg: UNetConfig = json(SD15_UNET);
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    UNet2DConditionModel::new(vs.root(), &cfg)?;
    let map = UNetMap::new(&cfg)?;
    parts.push(entries_of(&vs, |name, shape| {
        let rest = map
            .original(name)
            .expect("UNet variable without an original key");
        (format!("model.diffusion_model.{rest}"), shape.to_vec())
    }));
    drop(vs);

    let cfg: VaeConfig = json(SD15_VAE);
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    AutoencoderKL::new(vs.root(), &cfg)?;
    let levels = cfg.block_out_channels.len();
    parts.push(entries_of(&vs, |name, shape| {
        let m = vae_original(name, levels).expect("VAE variable without an original key");
        let mut shape = shape.to_vec();
        if m.key.contains(".attn_1.") && m.key.ends_with("weight") && !m.key.contains(".norm.") {
            shape.extend([1, 1]); // stored as 1x1 convolutions
        }
        (format!("first_stage_model.{}", m.key), shape)
    }));
    drop(vs);

    let cfg: ClipTextConfig = json(SD15_TEXT);
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    ClipTextTransformer::new(vs.root(), &cfg)?;
    let layout = TextLayout::Clip {
        prefix: "cond_stage_model.transformer.text_model.".into(),
    };
    parts.push(entries_of(&vs, |name, shape| {
        let m = text_original(name, &layout).expect("text variable without an original key");
        (m.key, shape.to_vec())
    }));
    drop(vs);
    write_file(path, parts)
}

/// One stored tensor of the SDXL file: its key and shape; its values are drawn when written.
struct Planned {
    key: String,
    shape: Vec<i64>,
}

/// The keys and stored shapes of every variable of the model `build` makes, through `key_of`
/// (`None`: the variable shares a stored tensor planned under another variable). The model is
/// built without initialising its memory: its pages are never touched.
fn plan_of<T>(
    build: impl FnOnce(tch::nn::Path) -> Result<T>,
    key_of: impl Fn(&str, &[i64]) -> Option<(String, Vec<i64>)>,
) -> Result<Vec<Planned>> {
    let _uninit = stable_diffusion::models::blocks::skip_random_init();
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    drop(build(vs.root())?);
    let mut vars: Vec<(String, Vec<i64>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.size()))
        .collect();
    vars.sort();
    Ok(vars
        .iter()
        .filter_map(|(name, shape)| key_of(name, shape))
        .map(|(key, shape)| Planned { key, shape })
        .collect())
}

/// An OpenCLIP or CLIP text tower's stored key and shape for variable `name`.
fn text_key(layout: &TextLayout, name: &str, shape: &[i64]) -> Option<(String, Vec<i64>)> {
    let m = text_original(name, layout).expect("text variable without an original key");
    let shape = match (m.transform, shape) {
        (Transform::Third(0), [rows, rest @ ..]) => [&[rows * 3], rest].concat(),
        (Transform::Third(_), _) => return None, // k and v: rows of the same in_proj
        (Transform::Transpose, [a, b]) => vec![*b, *a],
        _ => shape.to_vec(),
    };
    Some((m.key, shape))
}

/// Writes an SDXL base single file of random float16 weights, one tensor at a time.
fn make_sdxl_checkpoint(path: &Path) -> Result<u64> {
    let _g = tch::no_grad_guard();
    let mut plan = Vec::new();
    let unet: UNetConfig = json(SDXL_UNET);
    let map = UNetMap::new(&unet)?;
    plan.extend(plan_of(
        |vs| UNet2DConditionModel::new(vs, &unet),
        |name, shape| {
            let rest = map
                .original(name)
                .expect("UNet variable without an original key");
            Some((format!("model.diffusion_model.{rest}"), shape.to_vec()))
        },
    )?);
    let vae: VaeConfig = json(SD15_VAE);
    let levels = vae.block_out_channels.len();
    plan.extend(plan_of(
        |vs| AutoencoderKL::new(vs, &vae),
        |name, shape| {
            let m = vae_original(name, levels).expect("VAE variable without an original key");
            let mut shape = shape.to_vec();
            if m.transform == Transform::ConvToLinear {
                shape.extend([1, 1]); // stored as 1x1 convolutions
            }
            Some((format!("first_stage_model.{}", m.key), shape))
        },
    )?);
    let clip = TextLayout::Clip {
        prefix: "conditioner.embedders.0.transformer.text_model.".into(),
    };
    let text: ClipTextConfig = json(SD15_TEXT);
    plan.extend(plan_of(
        |vs| ClipTextTransformer::new(vs, &text),
        |name, shape| text_key(&clip, name, shape),
    )?);
    let bigg = TextLayout::OpenClip {
        prefix: "conditioner.embedders.1.model.".into(),
    };
    let text_2: ClipTextConfig = json(SDXL_TEXT_2);
    plan.extend(plan_of(
        |vs| ClipTextTransformer::new(vs, &text_2),
        |name, shape| text_key(&bigg, name, shape),
    )?);

    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for p in &plan {
        let len = p.shape.iter().product::<i64>() as usize * 2;
        header.insert(
            p.key.clone(),
            serde_json::json!({"dtype": "F16", "shape": p.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    write_safetensors(
        path,
        header,
        "random weights, SDXL base sizes",
        offset,
        |w| {
            tch::manual_seed(0);
            for p in &plan {
                // Small random values: what matters here is size, not content.
                let t = Tensor::randn(p.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02;
                w.write_all(&fp16_bytes(&t))?;
            }
            Ok(())
        },
    )
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Only builds the three SD 1.5 models with their random init, without reading any weights:
/// the part of a load that is not reading the file.
fn construct_only() -> Result<()> {
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)).sum(Kind::Float);
    let (cpu0, start) = (cpu_seconds(), Instant::now());
    let vs = VarStore::new(Device::Cpu);
    UNet2DConditionModel::new(vs.root(), &json::<UNetConfig>(SD15_UNET))?;
    AutoencoderKL::new(vs.root(), &json::<VaeConfig>(SD15_VAE))?;
    ClipTextTransformer::new(vs.root(), &json::<ClipTextConfig>(SD15_TEXT))?;
    println!(
        "fp32, building the models only (random init, no weights read): {:.1} s wall, {:.1} s CPU",
        start.elapsed().as_secs_f64(),
        cpu_seconds() - cpu0
    );
    Ok(())
}

fn measure(path: &Path, dtype: &str) -> Result<()> {
    let kind = match dtype {
        "fp32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        "fp16" => Kind::Half,
        other => return Err(Error::invalid(format!("dtype {other}"))),
    };
    // Start libtorch first so that its own footprint is the baseline, not part of the load.
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)).sum(Kind::Float);
    let base = status_kib("VmHWM:");
    let (cpu0, start) = (cpu_seconds(), Instant::now());
    let sd = StableDiffusion::load(
        path,
        &LoadOptions {
            kind,
            ..Default::default()
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let peak = status_kib("VmHWM:");
    let rss = status_kib("VmRSS:");
    println!(
        "{dtype}: load {secs:.1} s wall ({cpu:.1} s CPU), peak RSS {:.2} GiB ({:.2} GiB above the {:.2} GiB of libtorch \
         alone), RSS after load {:.2} GiB",
        gib(peak),
        gib(peak - base),
        gib(base),
        gib(rss)
    );
    drop(sd);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "measure" {
        return measure(Path::new(&args[2]), &args[3]);
    }
    if args.len() == 2 && args[1] == "construct" {
        return construct_only();
    }
    let sdxl = args.get(1).is_some_and(|a| a == "--sdxl");
    let dir = args
        .get(if sdxl { 2 } else { 1 })
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(if sdxl {
        "sdxl-random-fp16.safetensors"
    } else {
        "sd15-random-fp16.safetensors"
    });
    if !path.is_file() {
        eprintln!("writing {} ...", path.display());
        let start = Instant::now();
        let bytes = if sdxl {
            make_sdxl_checkpoint(&path)?
        } else {
            make_checkpoint(&path)?
        };
        eprintln!(
            "wrote {:.2} GB in {:.0} s",
            bytes as f64 / 1e9,
            start.elapsed().as_secs_f64()
        );
    }
    let size = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len() as f64;
    let params = (size / 2.0) / 1e9;
    println!(
        "{}: {:.2} GB on disk (float16), about {params:.2} G parameters: {:.2} GiB in fp32, \
         {:.2} GiB in bf16",
        path.display(),
        size / 1e9,
        size * 2.0 / (1u64 << 30) as f64,
        size / (1u64 << 30) as f64
    );
    let exe = std::env::current_exe().map_err(|e| Error::Internal(e.to_string()))?;
    let file = path.to_str().unwrap_or_default();
    let runs = if sdxl {
        vec![("bf16", vec!["measure", file, "bf16"])]
    } else {
        vec![
            ("fp32", vec!["measure", file, "fp32"]),
            ("bf16", vec!["measure", file, "bf16"]),
            ("construction", vec!["construct"]),
        ]
    };
    for (dtype, args) in runs {
        let status = std::process::Command::new(&exe)
            .args(&args)
            .status()
            .map_err(|e| Error::Internal(format!("cannot run {}: {e}", exe.display())))?;
        if !status.success() {
            return Err(Error::Internal(format!(
                "measuring {dtype} failed: {status}"
            )));
        }
    }
    Ok(())
}
