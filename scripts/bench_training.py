"""Training throughput of the nested adapter on random-weight UNets: python scripts/bench_training.py

One training step as `python -m na_engine train` takes it (na_engine.standalone.train.NestedDenoiser:
the frozen UNet with the nested processors, forward, backward into the adapter, clipped AdamW step),
on random latents, context and CLIP features. The frozen text encoders, VAE encode and CLIP vision
are left out: they run without gradients (the VAE encoder is of the order of one UNet forward at 512 px,
so a whole step is slower). Per shape it prints samples per
second and peak memory (CUDA: peak allocated; CPU: peak resident set, weights included), with gradient
checkpointing off and on and their ratio, measured side by side in one run, each in a fresh subprocess.

Shapes: tiny (the tests' UNet, 64 px), sd15 (SD1.5's UNet, 512 px), sdxl (SDXL's UNet, 1024 px).
On CPU the default is tiny and sd15 in fp32; on CUDA, sd15 and sdxl in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the repository root, for na_engine (under pytest it is there already, last)
    sys.path.insert(0, REPO)
from na_engine.adapter import random_adapter  # noqa: E402
from na_engine.layers import diffusers_layers  # noqa: E402
from na_engine.standalone.models import fresh_config  # noqa: E402
from na_engine.standalone.train import NestedDenoiser  # noqa: E402

UNETS = {
    "tiny": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the pooled text (1280)
    ),
}
VISION = {"tiny": (32, 17), "sd15": (1280, 257), "sdxl": (1280, 257)}  # CLIP width, patches (ViT-H/14)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(shape: str, batch: int, steps: int, checkpointing: bool, device, dtype) -> dict:
    """Samples per second over ``steps`` timed steps (after one warm-up step), and peak memory."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = UNETS[shape]
    unet = UNet2DConditionModel(**cfg).to(device, dtype).requires_grad_(False)
    width, patches = VISION[shape]
    layers = diffusers_layers(dict(unet.config))
    resampler = fresh_config(unet.config.cross_attention_dim, width, 16, 4)
    adapter = random_adapter(resampler, layers, seed=0).to(device).train()
    model = NestedDenoiser(adapter, unet, "dog")
    if checkpointing:
        unet.enable_gradient_checkpointing(model.processors.checkpoint)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    side = cfg["sample_size"]
    ctx = cfg["cross_attention_dim"]
    added = None
    if shape == "sdxl":
        added = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype),
        }
    where = torch.zeros(batch, 77, dtype=torch.bool, device=device)
    where[:, 5] = True

    def step():
        noisy = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
        context = torch.randn(batch, 77, ctx, device=device, dtype=dtype)
        features = torch.randn(batch, patches, width, device=device)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = model(noisy, timesteps, context, added, features, where)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    return {"samples_per_s": batch * steps / seconds, "peak_gib": peak_memory_gib(device)}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(UNETS), default=["sd15", "sdxl"] if cuda else ["tiny", "sd15"])
    p.add_argument("--batch", type=int, default=None, help="per step; default 8 (tiny), 4 on CUDA, 1 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 20 (tiny), 10 on CUDA, 2 on CPU")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    p.add_argument("--one", nargs=3, metavar=("SHAPE", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.one:  # one measurement, in this fresh process
        shape, batch, steps = args.one
        print(json.dumps(measure(shape, int(batch), int(steps), args.checkpointing, device, dtype)))
        return 0
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; torch {torch.__version__}; {args.dtype}")
    print(f"{'shape':6} {'batch':>5} {'ckpt':>4} {'samples/s':>10} {'s/sample':>9} {'peak GiB':>9}")
    for shape in args.shapes:
        batch = args.batch or (8 if shape == "tiny" else 4 if cuda else 1)
        steps = args.steps or (20 if shape == "tiny" else 10 if cuda else 2)
        rates = {}
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--one", shape, str(batch), str(steps), "--dtype", args.dtype]
            out = subprocess.run(cmd + ["--checkpointing"] * checkpointing, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{shape:6} {batch:5d} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rates[checkpointing] = r["samples_per_s"]
            print(
                f"{shape:6} {batch:5d} {'on' if checkpointing else 'off':>4} {r['samples_per_s']:10.3f} "
                f"{1 / r['samples_per_s']:9.2f} {r['peak_gib']:9.2f}",
                flush=True,
            )
        if len(rates) == 2:
            print(f"{shape:6} checkpointing takes {rates[False] / rates[True]:.2f}x the time of no checkpointing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
