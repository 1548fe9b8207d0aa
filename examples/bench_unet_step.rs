//! One denoising step of an SD 1.5-size UNet (random weights) on the CPU, for profiling the
//! UNet alone (`tools/bench/diffusers_unet_step.py` is diffusers' counterpart). The UNet is built
//! in memory, which hides load and memory costs: comparisons with diffusers come from
//! `make bench` (examples/bench.rs) only.
//!
//!     cargo run --example bench_unet_step            # 512x512, CFG batch 2, 3 timed steps
//!     SD_BENCH_SIZE=256 SD_BENCH_STEPS=5 cargo run --example bench_unet_step
use stable_diffusion::models::{UNet2DConditionModel, UNetConfig};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// diffusers' config of stable-diffusion-v1-5's UNet.
const SD15_UNET: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

fn env_or(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> stable_diffusion::Result<()> {
    let size = env_or("SD_BENCH_SIZE", 512);
    let steps = env_or("SD_BENCH_STEPS", 3);
    let batch = env_or("SD_BENCH_BATCH", 2);
    let config: UNetConfig = serde_json::from_str(SD15_UNET).expect("embedded config");
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config)?;
    vs.freeze();
    let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    let _no_grad = tch::no_grad_guard();
    let latents = Tensor::randn([batch, 4, size / 8, size / 8], (Kind::Float, Device::Cpu));
    let context = Tensor::randn([batch, 77, 768], (Kind::Float, Device::Cpu));
    println!(
        "UNet SD1.5 size: {:.0} M parameters, {} threads, latents {:?}",
        params as f64 / 1e6,
        tch::get_num_threads(),
        latents.size()
    );
    let warm = Instant::now();
    let out = unet.forward(&latents, 999.0, &context)?;
    println!(
        "warm-up step: {:.2} s (output max |x| {:.3e})",
        warm.elapsed().as_secs_f64(),
        out.abs().max().double_value(&[])
    );
    let start = Instant::now();
    for i in 0..steps {
        let _ = unet.forward(&latents, 999.0 - 50.0 * i as f64, &context)?;
    }
    let per_step = start.elapsed().as_secs_f64() / steps as f64;
    println!(
        "ours: {per_step:.3} s per UNet step (mean of {steps}), peak RSS {:.0} MiB",
        peak_rss_mib()
    );
    Ok(())
}
