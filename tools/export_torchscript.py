#!/usr/bin/env python3
"""Export a diffusers Stable Diffusion pipeline folder to TorchScript for the Rust library.

    python tools/export_torchscript.py MODEL_DIR OUT_DIR [--dtype fp32|fp16] [--device cpu|cuda]

MODEL_DIR is a diffusers StableDiffusion (or StableDiffusionInpaint) folder: unet/, vae/,
text_encoder/, tokenizer/, scheduler/. OUT_DIR receives:

  text_encoder.pt   input_ids [b, tokens] int64 -> every hidden state with the final layer norm
                    applied, stacked: [layers + 1, b, tokens, dim] (index 0 = embeddings,
                    index layers - k = clip_skip k)
  unet.pt           (sample [b, c, h, w], timestep [b] float, encoder_hidden_states [b, t, d])
                    -> noise (or v) prediction [b, out_channels, h, w]
  vae_encoder.pt    images [b, 3, H, W] in [-1, 1] -> moments [b, 2 * latent_channels, h, w]
                    (after quant_conv)
  vae_decoder.pt    unscaled latents [b, latent_channels, h, w] -> images [b, 3, H, W]
                    (post_quant_conv included)
  tokenizer/        copied from MODEL_DIR
  scheduler/scheduler_config.json
  manifest.json     format "stable-diffusion-torchscript", version 1, dtype, device, the
                    model dimensions the pipeline needs and the traced example shapes

Every module is traced with torch.jit.trace, then checked against the eager module on a batch
size and spatial size different from the traced ones (and after a save/load round trip): the
export fails if anything was baked into the trace. Traced graphs keep the device and dtype they
were traced with, so the Rust loader runs each module in the exported dtype (converting inputs
and outputs) and refuses a device type other than the exported one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

# Tracing warns about every Python branch on a shape; each module is checked against eager
# PyTorch on other shapes below instead.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

FORMAT = "stable-diffusion-torchscript"
VERSION = 1


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def variant_of(folder: Path, stem: str) -> str | None:
    """diffusers' `variant` for a part stored only as `<stem>.<variant>.safetensors`/`.bin`."""
    for ext in ("safetensors", "bin"):
        if (folder / f"{stem}.{ext}").is_file():
            return None
    for ext in ("safetensors", "bin"):
        found = sorted(folder.glob(f"{stem}.*.{ext}"))
        if found:
            return found[0].name[len(stem) + 1 : -len(ext) - 1]
    return None


def load_parts(model_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (model_dir / part).is_dir():
            fail(f"{model_dir} has no {part}/ folder: not a diffusers Stable Diffusion folder")
    index = model_dir / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        if any(s in cls for s in ("XL", "Flux", "StableDiffusion3")):
            fail(f"{cls} pipelines are not supported (only SD 1.x / 2.x)")
    unet = UNet2DConditionModel.from_pretrained(
        model_dir / "unet",
        variant=variant_of(model_dir / "unet", "diffusion_pytorch_model"),
        torch_dtype=dtype,
    )
    vae = AutoencoderKL.from_pretrained(
        model_dir / "vae",
        variant=variant_of(model_dir / "vae", "diffusion_pytorch_model"),
        torch_dtype=dtype,
    )
    text_encoder = CLIPTextModel.from_pretrained(
        model_dir / "text_encoder",
        variant=variant_of(model_dir / "text_encoder", "model"),
        torch_dtype=dtype,
    )
    return unet, vae, text_encoder


# ----------------------------------------------------------------------------------------------
# wrappers: plain tensor in, plain tensor out


class TextEncoderAllLayers(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        # transformers 4 nests the transformer under .text_model; transformers 5 does not.
        inner = getattr(text_encoder, "text_model", text_encoder)
        self.final_layer_norm = inner.final_layer_norm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return torch.stack([self.final_layer_norm(h) for h in out.hidden_states], 0)


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, images):
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)

    def forward(self, latents):
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


# ----------------------------------------------------------------------------------------------
# tracing and checking


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf"), float(b.abs().max())
    return float((a - b).abs().max()), float(b.abs().max())


def check(name: str, eager, traced, reloaded, inputs_list, tol: float) -> list[dict]:
    """Compares the traced and reloaded modules with the eager one on every input tuple."""
    report = []
    for inputs in inputs_list:
        want = eager(*inputs)
        for label, module in (("traced", traced), ("reloaded", reloaded)):
            got = module(*inputs)
            err, scale = max_err(got, want)
            shapes = [list(t.shape) for t in inputs]
            if not err <= tol * max(1.0, scale):
                fail(f"{name}: the {label} module disagrees with eager PyTorch on inputs of shape "
                     f"{shapes}: max abs error {err:.3e} (output {list(got.shape)}, expected "
                     f"{list(want.shape)}): the trace does not generalise (a shape or value was "
                     f"baked in)")
            report.append({"inputs": shapes, "module": label, "max_abs_error": err})
        print(f"  {name}: {[list(t.shape) for t in inputs]} -> {list(want.shape)} ok "
              f"(max abs error {max(r['max_abs_error'] for r in report[-2:]):.2e})")
    return report


def strip_debug_info(path: Path) -> None:
    """Rewrites the TorchScript archive without its optional `*.debug_pkl` records: the Python
    call stacks of the trace, with this machine's absolute paths and this script's line numbers.
    The export then depends only on the model and the library versions (and is smaller); the
    reloaded archive is checked like the traced module."""
    import zipfile

    tmp = path.with_suffix(".pt.tmp")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zout.writestr(entry, zin.read(info.filename))
    tmp.replace(path)


def trace_save(name: str, module, example, checks, out_dir: Path, tol: float):
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False, strict=False,
                                 _store_inputs=False)
        path = out_dir / f"{name}.pt"
        traced.save(str(path))
        strip_debug_info(path)
        reloaded = torch.jit.load(str(path), map_location=example[0].device)
        reloaded.eval()
        try:
            report = check(name, module, traced, reloaded, [example] + checks, tol)
        except BaseException:
            path.unlink(missing_ok=True)  # no manifest is written: leave no half export
            raise
        out = module(*example)
    return {
        "file": path.name,
        "inputs": [list(t.shape) for t in example],
        "output": list(out.shape),
        "checks": [r["inputs"] for r in report if r["module"] == "traced"][1:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="diffusers Stable Diffusion pipeline folder")
    ap.add_argument("out_dir", type=Path, help="output folder (created; files are overwritten)")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but this PyTorch sees no CUDA device")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.manual_seed(0)

    model_dir: Path = args.model_dir
    if not model_dir.is_dir():
        fail(f"model folder {model_dir} does not exist")
    unet, vae, text_encoder = load_parts(model_dir, dtype)
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "unet.pt", "vae_encoder.pt", "vae_decoder.pt",
                  "text_encoder.pt"):
        (out_dir / stale).unlink(missing_ok=True)

    tcfg, ucfg, vcfg = text_encoder.config, unet.config, vae.config
    tokens = int(tcfg.max_position_embeddings)
    hidden = int(tcfg.hidden_size)
    layers = int(tcfg.num_hidden_layers)
    vocab = int(tcfg.vocab_size)
    latent_c = int(vcfg.latent_channels)
    vae_scale = 2 ** (len(vcfg.block_out_channels) - 1)
    cross = ucfg.cross_attention_dim
    cross = list(cross) if isinstance(cross, (list, tuple)) else [cross]
    if any(c != hidden for c in cross):
        fail(f"UNet cross_attention_dim {cross} does not match the text encoder's hidden_size "
             f"{hidden}")
    if ucfg.out_channels != latent_c:
        fail(f"UNet out_channels {ucfg.out_channels} differs from the VAE's latent_channels "
             f"{latent_c}")
    # Latent sides that are not a multiple of the UNet's overall up factor make diffusers pass the
    # skip connections' sizes to every upsampler: tracing that path keeps the output size
    # following the input for any size.
    ups = 2 ** sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None) is not None)

    def ids(b: int, seed: int, n: int = tokens) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (b, n), generator=g).to(device)

    def randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)

    def uniform(shape, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)

    def steps(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    manifest_shapes = {}
    print(f"== exporting {model_dir} -> {out_dir} ({args.dtype}, {args.device})")

    manifest_shapes["text_encoder"] = trace_save(
        "text_encoder", TextEncoderAllLayers(text_encoder).eval(), (ids(2, 1),),
        [(ids(1, 2),), (ids(3, 3),), (ids(1, 4, tokens // 2 + 1),)], out_dir, tol)

    in_c = int(ucfg.in_channels)
    h, w = 2 * ups + 1, 3 * ups + 1
    manifest_shapes["unet"] = trace_save(
        "unet", UNetWrapper(unet).eval(),
        (randn((2, in_c, h, w), 10), steps([537.0, 537.0]), randn((2, tokens, hidden), 11)),
        [
            (randn((1, in_c, 2 * ups, 2 * ups), 12), steps([10.0]),
             randn((1, tokens, hidden), 13)),
            (randn((3, in_c, 4 * ups, 3 * ups), 14), steps([999.0, 1.5, 250.0]),
             randn((3, tokens, hidden), 15)),
            (randn((1, in_c, 3 * ups + 1, 2 * ups + 3), 16), steps([0.0]),
             randn((1, tokens, hidden), 17)),
        ],
        out_dir, tol)

    s = vae_scale
    manifest_shapes["vae_encoder"] = trace_save(
        "vae_encoder", VaeEncoderWrapper(vae).eval(), (uniform((1, 3, 4 * s, 6 * s), 20),),
        [(uniform((2, 3, 6 * s, 4 * s), 21),), (uniform((1, 3, 8 * s, 8 * s), 22),)],
        out_dir, tol)
    manifest_shapes["vae_decoder"] = trace_save(
        "vae_decoder", VaeDecoderWrapper(vae).eval(), (randn((1, latent_c, 4, 6), 30),),
        [(randn((2, latent_c, 6, 4), 31),), (randn((1, latent_c, 8, 10), 32),)],
        out_dir, tol)

    shutil.copytree(model_dir / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    (out_dir / "scheduler").mkdir(exist_ok=True)
    shutil.copy(model_dir / "scheduler" / "scheduler_config.json",
                out_dir / "scheduler" / "scheduler_config.json")

    import diffusers
    import transformers

    index = model_dir / "model_index.json"
    pipeline_class = (json.loads(index.read_text(encoding="utf-8")).get("_class_name")
                      if index.is_file() else None)
    sample_size = ucfg.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    shift = getattr(vcfg, "shift_factor", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": args.dtype,
        "device": str(torch.zeros(1, device=device).device),
        "pipeline_class": pipeline_class,
        "unet": {
            "in_channels": in_c,
            "out_channels": int(ucfg.out_channels),
            "sample_size": None if sample_size is None else int(sample_size),
            "cross_attention_dim": hidden,
        },
        "vae": {
            "latent_channels": latent_c,
            "spatial_scale": vae_scale,
            "scaling_factor": float(vcfg.scaling_factor),
            "shift_factor": None if shift is None else float(shift),
        },
        "text": {
            "max_position_embeddings": tokens,
            "hidden_size": hidden,
            "num_layers": layers,
            "vocab_size": vocab,
        },
        "example_shapes": manifest_shapes,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(out_dir / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"== wrote {out_dir} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
