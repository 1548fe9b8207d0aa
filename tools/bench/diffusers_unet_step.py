"""The same measurement as `cargo run --example bench_unet_step`, with diffusers' UNet2DConditionModel.

Run from the repo root with the fixture venv (tools/make_fixtures.sh creates it):
    .venv-fixtures/bin/python tools/bench/diffusers_unet_step.py
Environment: SD_BENCH_SIZE (512), SD_BENCH_STEPS (3), SD_BENCH_BATCH (2), as the Rust bench.
"""
import os
import resource
import time

import torch
from diffusers import UNet2DConditionModel

size = int(os.environ.get("SD_BENCH_SIZE", 512))
steps = int(os.environ.get("SD_BENCH_STEPS", 3))
batch = int(os.environ.get("SD_BENCH_BATCH", 2))

config = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
torch.manual_seed(0)
unet = UNet2DConditionModel(**config).eval()
params = sum(p.numel() for p in unet.parameters())
latents = torch.randn(batch, 4, size // 8, size // 8)
context = torch.randn(batch, 77, 768)
print(f"UNet SD1.5 size: {params / 1e6:.0f} M parameters, {torch.get_num_threads()} threads, latents {list(latents.shape)}")
with torch.no_grad():
    t0 = time.perf_counter()
    unet(latents, 999, context)
    print(f"warm-up step: {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    for i in range(steps):
        unet(latents, 999 - 50 * i, context)
    per_step = (time.perf_counter() - t0) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"diffusers: {per_step:.3f} s per UNet step (mean of {steps}), peak RSS {peak:.0f} MiB")
