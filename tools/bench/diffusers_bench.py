"""diffusers' side of `make bench` (examples/bench.rs runs it; not needed to build or run us).

    python tools/bench/diffusers_bench.py make-folder DIR [sd15|sdxl]
        Writes an SD 1.5-size (default; float32 safetensors, about 4.3 GB) or SDXL-size (the
        base 1.0 configs: two text encoders, about 13.9 GB) diffusers folder with seeded random
        weights and the full CLIP vocabulary built from assets/, unless DIR/.complete exists.

    python tools/bench/diffusers_bench.py run DIR SIZE STEPS GUIDANCE THREADS SEED IMAGE_OUT [DTYPE]
        One cold measurement, in this fresh process: load, txt2img (Euler, CFG), per-step times,
        warm text encode; prints one JSON line and writes the image as raw RGB8 to IMAGE_OUT.
        DTYPE fp32, or bf16: the float32 pipeline under torch.autocast("cpu", torch.bfloat16).

    python tools/bench/diffusers_bench.py decode DIR SIZE TILE THREADS SEED
        One cold VAE decode of seeded latents for a SIZE x SIZE image, in this fresh process:
        in tiles of TILE pixels (`enable_tiling`, tile_sample_min_size = TILE) or, with TILE 0,
        whole; prints one JSON line with `decode_s` and `peak_rss_mib`
        (examples/bench_engine.rs runs it).

Everything runs on the CPU (float32, or bf16 autocast) with THREADS intra-op threads. The
figures mean the same as ours (see examples/bench.rs): `load_s` from the call to
`from_pretrained` to a ready pipeline, `first_step_s` from the call to the end of the first
step (`first_step_unix_s` is that moment by the wall clock, for the bench's spawn-to-first-step
row), `step_s` the median time between two step callbacks, `decode_s` from the last step to the
image, `total_s` the whole txt2img call, `peak_rss_mib` the process's peak resident set.
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red fox in the snow, detailed fur, soft morning light"
NEGATIVE = "blurry, low quality"

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# stabilityai/stable-diffusion-xl-base-1.0's configs
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, norm_num_groups=32,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)
SDXL_VAE = dict(SD15_VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)


def make_folder(folder: Path, family: str = "sd15") -> None:
    if (folder / ".complete").exists():
        print(f"{folder}: already written")
        return
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    sys.path.insert(0, str(REPO / "tools" / "fixtures"))
    from models import EOS, truncated_clip_vocab, write_vocab_and_merges

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = truncated_clip_vocab(49152 - 256 - 2)
    tok_dir = folder / "tokenizer"
    write_vocab_and_merges(tok_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token=EOS, model_max_length=77)
    assert len(tokenizer) == 49408, len(tokenizer)
    torch.manual_seed(0)
    if family == "sdxl":
        tok_dir_2 = folder / "tokenizer_2"
        write_vocab_and_merges(tok_dir_2, vocab, merges)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir_2, pad_token="!", model_max_length=77)
        with torch.no_grad():
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER),
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / ".complete").write_text("written by tools/bench/diffusers_bench.py\n")
        print(f"{folder}: written")
        return
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / ".complete").write_text("written by tools/bench/diffusers_bench.py\n")
    print(f"{folder}: written")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(folder: Path, size: int, steps: int, guidance: float, threads: int, seed: int,
        image_out: Path, dtype: str) -> None:
    import contextlib

    import torch

    torch.set_num_threads(threads)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = (folder / "text_encoder_2").is_dir()
    fast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
            else contextlib.nullcontext())
    with torch.no_grad(), fast:
        t0 = time.perf_counter()
        if xl:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                folder, torch_dtype=torch.float32, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=torch.float32, safety_checker=None,
                requires_safety_checker=False
            )
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0

        marks = []
        first_unix_s = []

        def on_step(_pipe, _i, _t, kwargs):
            if not marks:
                first_unix_s.append(time.time())
            marks.append(time.perf_counter())
            return kwargs

        t0 = time.perf_counter()
        out = pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
            height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np", callback_on_step_end=on_step,
        )
        end = time.perf_counter()
        image = out.images[0].astype("float32")
        rgb = (image * 255).round().clip(0, 255).astype("uint8")
        image_out.write_bytes(rgb.tobytes())

        encode = []
        for _ in range(3):
            t = time.perf_counter()
            pipe.encode_prompt(prompt=PROMPT, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
            encode.append(time.perf_counter() - t)

    gaps = [b - a for a, b in zip(marks, marks[1:])]
    print(json.dumps({
        "load_s": load_s,
        "first_step_s": marks[0] - t0,
        "first_step_unix_s": first_unix_s[0],
        "step_s": statistics.median(gaps) if gaps else marks[0] - t0,
        "decode_s": end - marks[-1],
        "total_s": end - t0,
        "encode_s": statistics.median(encode),
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "version": __import__("diffusers").__version__,
    }))


def decode(folder: Path, size: int, tile: int, threads: int, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if tile:
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // scale
    latents = torch.randn(1, vae.config.latent_channels, size // scale, size // scale,
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        t = time.perf_counter()
        image = vae.decode(latents).sample
        decode_s = time.perf_counter() - t
    assert image.shape[-1] == size, image.shape
    print(json.dumps({"decode_s": decode_s, "peak_rss_mib": peak_rss_mib(),
                      "threads": torch.get_num_threads()}))


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "decode":
        a = sys.argv[2:]
        decode(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]))
        return 0
    if len(sys.argv) in (3, 4) and sys.argv[1] == "make-folder":
        make_folder(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else "sd15")
        return 0
    if len(sys.argv) in (9, 10) and sys.argv[1] == "run":
        a = sys.argv[2:] + ["fp32"]
        run(Path(a[0]), int(a[1]), int(a[2]), float(a[3]), int(a[4]), int(a[5]), Path(a[6]), a[7])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
