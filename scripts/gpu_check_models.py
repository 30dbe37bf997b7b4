"""The model parts of scripts/gpu_check.py: a whole denoising step with and without the nested processors, and
the trainer's throughput.  Every model has random weights, built here at the real widths (tiny in a dry run).

The step runs the diffusers host (na_engine.hosts.diffusers_processor), the one standalone generation and the
trainer use; the ComfyUI Patch runs the same nested_attention per layer.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from typing import Callable, Dict, List

import torch
from bench_training import UNETS
from gpu_check_layers import TRIGGER, median_times, peak_extra_bytes  # puts tests/support on the path, for:
from tiny_diffusers import TINY_FLUX, TINY_XL_UNET

from na_engine.adapter import random_adapter
from na_engine.binding import ModelCall, Placement
from na_engine.layers import diffusers_layers, dit_layers
from na_engine.standalone.models import fresh_config
from na_engine.subjects import Subject

FLUX_DEV = dict(  # FLUX.1-dev's transformer: 19 double and 38 single blocks of 24 heads x 128
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SDXL_VAE = dict(  # SDXL's AutoencoderKL
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
)
VISION_WIDTH = 1280  # CLIP ViT-H/14, the image encoder of SDXL's and Flux's adapters
TOKENS = 16  # the adapter's subject tokens


def preload() -> None:
    """Import what the model parts use, once, in the process that forks them (diffusers' model classes take
    seconds to import); a missing package is left for the part that needs it to report."""
    try:
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPVisionModelWithProjection  # noqa: F401

        import na_engine.standalone.train  # noqa: F401
    except ImportError:
        pass


def _build(cls, config: dict, device: str, dtype: torch.dtype):
    """A random-weight model built on ``device`` (fast for billions of parameters), frozen, in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**config)
    return model.to(dtype).eval().requires_grad_(False)


def _subject(layers, context: int, device: str, dtype: torch.dtype) -> Subject:
    adapter = random_adapter(fresh_config(context, VISION_WIDTH, TOKENS, 4), layers).to(device, dtype)
    return Subject(torch.randn(TOKENS, context, device=device, dtype=dtype), adapter, "dog")


def step_sdxl(ctx, part) -> None:
    """One UNet call at 1024 px (the dry run: the tests' tiny SDXL-shaped UNet), CFG batch, fp16 (the dry run:
    bf16, as CPU inference in bf16 takes the statistics path; in fp32 it would build the C++ CPU kernel)."""
    from diffusers import UNet2DConditionModel

    config = TINY_XL_UNET if ctx.dry else UNETS["sdxl"]
    dtype = torch.float16 if ctx.device == "cuda" else torch.bfloat16
    unet = _build(UNet2DConditionModel, config, ctx.device, dtype)
    side, width = config["sample_size"], config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    pixels = side * 8
    g = torch.Generator(ctx.device).manual_seed(0)

    def noise(*shape):
        return torch.randn(*shape, generator=g, device=ctx.device, dtype=dtype)

    inputs = dict(
        sample=noise(2, 4, side, side),
        timestep=torch.tensor([500, 500], device=ctx.device),
        encoder_hidden_states=noise(2, 77, width),
        added_cond_kwargs={
            "text_embeds": noise(2, pooled),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2, device=ctx.device, dtype=dtype),
        },
    )
    layers = diffusers_layers(dict(unet.config))
    where = torch.zeros(2, 77, dtype=torch.bool, device=ctx.device)
    where[1, TRIGGER] = True  # [negative, positive]: the positive row binds
    call = ModelCall([Placement(_subject(layers, width, ctx.device, dtype), where)], (side, side), halves=2)
    part.add(_compare_step(ctx, "sdxl", unet, lambda: unet(**inputs).sample, call, layers, dtype, pixels, batch=2))


def step_flux(ctx, part) -> None:
    """One Flux transformer call at 1024 px (the dry run: the tests' tiny Flux), B = 1 (Flux's guidance is
    distilled: no CFG batch), bf16 (Flux overflows fp16)."""
    from diffusers import FluxTransformer2DModel

    config = TINY_FLUX if ctx.dry else FLUX_DEV
    dtype = torch.bfloat16
    model = _build(FluxTransformer2DModel, config, ctx.device, dtype)
    grid, text = (4, 16) if ctx.dry else (64, 512)  # packed latent tokens per side (1024 px / 16), T5 tokens
    g = torch.Generator(ctx.device).manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    inputs = dict(
        hidden_states=torch.randn(1, grid * grid, config["in_channels"], generator=g, device=ctx.device, dtype=dtype),
        encoder_hidden_states=torch.randn(
            1, text, config["joint_attention_dim"], generator=g, device=ctx.device, dtype=dtype
        ),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g, device=ctx.device, dtype=dtype),
        timestep=torch.tensor([0.5], device=ctx.device, dtype=dtype),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(ctx.device, dtype),
        txt_ids=torch.zeros(text, 3, device=ctx.device, dtype=dtype),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], device=ctx.device, dtype=dtype)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    layers = dit_layers(config["num_layers"], config["num_single_layers"], width)
    where = torch.zeros(1, text, dtype=torch.bool, device=ctx.device)
    where[0, TRIGGER] = True
    call = ModelCall([Placement(_subject(layers, width, ctx.device, dtype), where)], (grid, grid))
    pixels = grid * 16
    part.add(_compare_step(ctx, "flux", model, lambda: model(**inputs).sample, call, layers, dtype, pixels, batch=1))


@torch.no_grad()
def _compare_step(ctx, name: str, model, forward: Callable, call: ModelCall, layers, dtype, pixels, batch) -> dict:
    """Time one model call three ways, interleaved: diffusers' own attention processors (stock), the nested
    processors with no subject in the call (unbound), and with the subject bound (nested)."""
    from na_engine.hosts.diffusers_processor import install

    stock = dict(model.attn_processors)
    processors = install(model, layers)
    ours = dict(model.attn_processors)

    def bound():
        with processors.bound(call):
            return forward()

    variants: Dict[str, Callable] = {"stock": forward, "unbound": forward, "nested": bound}
    prepare = {  # set_attn_processor empties the dict it is given: a copy each time
        "stock": lambda: model.set_attn_processor(dict(stock)),
        "unbound": lambda: model.set_attn_processor(dict(ours)),
        "nested": lambda: model.set_attn_processor(dict(ours)),
    }
    times = median_times(variants, ctx.warmup_model, ctx.repeats_model, ctx.device, prepare)
    memory = {}
    for variant, fn in variants.items():
        prepare[variant]()
        memory[variant] = peak_extra_bytes(fn, ctx.device)
    fired = sum(1 for count in processors.fired.values() if count)
    return {
        "model": name,
        "pixels": pixels,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters_billion": sum(p.numel() for p in model.parameters()) / 1e9,
        "ms": {v: t * 1e3 for v, t in times.items()},
        "x_stock": {v: t / times["stock"] for v, t in times.items()},
        "peak_extra_gib": {v: None if b is None else b / 2**30 for v, b in memory.items()},
        "layers_bound": f"{fired}/{len(layers)}",
    }


def training(ctx, part) -> None:
    """python -m na_engine train (its main, in this process) on a random-weight SDXL-shaped base: SDXL's UNet
    and VAE, 2-layer text encoders and CLIP vision at the real widths and lengths (they run without gradients);
    steps per second after the first step (timed at the end of each optimizer step), and the peak memory."""
    from tiny_diffusers import make_base_xl, make_clip_vision, make_photos

    from na_engine.standalone import train
    from na_engine.standalone.prepare import prepare

    root = os.path.join(ctx.scratch, "training")
    resolution, batch, steps = (32, 1, 2) if ctx.dry else (1024, 2, 20)
    precision = "no" if ctx.dry else "bf16"  # fp32 on CPU: bf16 autocast there is many times slower
    base_size = {} if ctx.dry else dict(unet=UNETS["sdxl"], text=(768, 1280), tokens=77, vae=SDXL_VAE)
    with torch.device(ctx.device):
        base = make_base_xl(os.path.join(root, "base"), dtype=None if ctx.dry else torch.bfloat16, **base_size)
    vision_size = {} if ctx.dry else dict(hidden=VISION_WIDTH, image=224, patch=14)
    vision = make_clip_vision(os.path.join(root, "vision"), **vision_size)
    data = os.path.join(root, "data")
    prepare(make_photos(os.path.join(root, "photos"), count=4, size=resolution + 16), data, "dog", resolution)
    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = os.path.join(root, "adapter.safetensors")
    argv = ["--base", base, "--clip-vision", vision, "--data", data, "--out", out, "--steps", str(steps)]
    argv += ["--batch-size", str(batch), "--mixed-precision", precision, "--checkpoint-every", str(steps)]
    stamps = _stamp_steps(train, ctx.device)
    code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"python -m na_engine train exited with {code} (its message is above)")
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    part.add(
        {
            "base": "SDXL-shaped (tiny)" if ctx.dry else "SDXL UNet + VAE, 2-layer text encoders and CLIP vision",
            "resolution": resolution,
            "batch": batch,
            "mixed_precision": precision,
            "steps_timed": len(stamps) - 1,
            "steps_per_s": rate,
            "samples_per_s": rate * batch,
            "peak_gib": _peak_gib(ctx.device),
            "peak_kind": "CUDA allocated" if ctx.device == "cuda" else "resident set (the forked parent's included)",
        }
    )


def _stamp_steps(train, device: str) -> List[float]:
    """The time at the end of each optimizer step of train.train (its optimizer_step, wrapped in place)."""
    stamps: List[float] = []
    step = train.optimizer_step

    def stamped(run, count):
        count = step(run, count)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return count

    train.optimizer_step = stamped
    return stamps


def _peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
