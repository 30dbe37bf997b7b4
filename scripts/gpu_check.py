"""The prepared GPU check: python scripts/gpu_check.py [--dry-run] [--out gpu_check.json]

On one CUDA device, in at most 8 minutes, each part under a time limit of its own:
  device      the card, torch, CUDA and cuDNN
  exactness   every nested-attention method against a float64 reference at SD1.5, SDXL and Flux layer shapes,
              fp16 and bf16, next to stock SDPA's own error in the same dtype (scripts/gpu_check_layers.py)
  layers      one layer's time (CUDA events, median after warm-up) and peak memory against stock SDPA, and
              which SDPA kernel the fused call and the stock call get
  step_sdxl   one call of a full-width random-weight SDXL UNet at 1024 px, fp16, CFG batch: diffusers' own
              attention against the nested processors, with and without a subject (scripts/gpu_check_models.py)
  training    python -m na_engine train on a random-weight SDXL-shaped base at 1024 px: steps/s, peak memory
  step_flux   as step_sdxl on a full-size random-weight Flux transformer (bf16, B = 1), if the time is left
Each part runs in a process of its own (forked), so that a crash or a stuck kernel costs that part alone; it
stops its loop when its limit is near (the rest noted as skipped) and is killed at the limit, keeping what
it finished.  One JSON file, then a summary in Markdown for the README's performance section.

--dry-run takes the same code on CPU at tiny shapes, in under a minute.  What differs: layers in fp16 and bf16
as on the GPU, but their times are one layer of each model and wall-clock (meaningless at these sizes); the
models in bf16 (so that auto picks the statistics path, not the C++ kernel: on CPU the processors never take the
fused path); no peak memory (CUDA only) except the trainer's resident set; the CPU's SDPA kernel.  The parent
process runs no torch computation: a process forked after torch's thread pool has run can deadlock.
tests/core/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional

# torch.cuda.is_available() by NVML, which leaves CUDA uninitialised in this process: the parts it forks use CUDA.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch  # noqa: E402
from gpu_check_layers import FULL, TINY, exactness, layer_bench  # noqa: E402
from gpu_check_models import preload, step_flux, step_sdxl, training  # noqa: E402
from gpu_check_table import summary  # noqa: E402

TOTAL_S = 480  # 8 minutes on one H100, start-up of each part included
GRACE_S = 5  # past its limit, a part that has not stopped is killed
MIN_PART_S = 15  # a part that would get less than this of the total is skipped


def device_info(ctx, part) -> None:
    """The machine; on CUDA the first use of the device, in a process of its own like every part (the parent
    never touches CUDA, so that the parts it forks can)."""
    info = {"device": ctx.device}
    if ctx.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; on a CPU machine run --dry-run")
        props = torch.cuda.get_device_properties(0)
        info.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    part.add(info)


PARTS = [  # name, function, limit in seconds on CUDA (8 minutes in all)
    ("device", device_info, 30),
    ("exactness", exactness, 60),
    ("layers", layer_bench, 80),
    ("step_sdxl", step_sdxl, 80),
    ("training", training, 150),
    ("step_flux", step_flux, 80),
]
DRY_LIMIT_S, DRY_TOTAL_S = 300, 1200  # the dry run's, per part and in all: about 35 s of CPU time, but CI's
# machine may be shared, and the dry run must not fail for want of time


@dataclass
class Context:
    """What every part reads: where it runs and at what size."""

    device: str
    dry: bool
    scratch: str  # a folder for the files a part writes (the training base, its data)
    shapes: list = field(default_factory=list)  # exactness
    bench_shapes: list = field(default_factory=list)  # layer times and kernels
    warmup: int = 5  # layer calls before timing
    repeats: int = 25
    warmup_model: int = 2  # whole model calls
    repeats_model: int = 5


class Part:
    """One part's results as it goes, rewritten to its file after each item, so that a killed part keeps them."""

    def __init__(self, path: str, limit: float):
        self.path, self.limit, self.deadline = path, limit, time.monotonic() + limit
        self.items: List[dict] = []
        self.notes: List[str] = []
        self.status = "running"

    def add(self, item: dict) -> None:
        self.items.append(item)
        self.write()

    def out_of_time(self, next_item: str, margin: float = 0.15) -> bool:
        """Whether the part should stop before ``next_item``: less than ``margin`` of its limit is left (noted)."""
        if time.monotonic() < self.deadline - margin * self.limit:
            return False
        self.notes.append(f"stopped before {next_item}: its time limit was near")
        self.write()
        return True

    def write(self) -> None:
        record = {"status": self.status, "items": self.items, "notes": self.notes}
        with open(self.path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def _child(fn: Callable, ctx: Context, path: str, limit: float) -> None:
    part = Part(path, limit)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the summary's (the trainer prints too)
            fn(ctx, part)
        part.status = "ok"
    except Exception as e:  # the part's failure is its result; the other parts go on
        traceback.print_exc()
        part.status = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    part.write()


def run_part(name: str, fn: Callable, limit: float, ctx: Context) -> dict:
    """Run one part in a forked process for at most ``limit`` seconds (+ GRACE_S), and read what it left."""
    path = os.path.join(ctx.scratch, name + ".json")
    start, cpu = time.monotonic(), _children_cpu_s()
    # fork: the parts share this process's imports; spawn where something here has initialised CUDA after all.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    child = multiprocessing.get_context(method).Process(target=_child, args=(fn, ctx, path, limit), name=name)
    child.start()
    child.join(limit + GRACE_S)
    killed = child.is_alive()
    if killed:
        child.kill()
        child.join()
    record = {"status": "no result", "items": [], "notes": []}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    if killed:
        record["status"] = f"killed at its time limit ({limit:.0f} s)"
    elif record["status"] == "running":
        record["status"] = f"the process died (exit code {child.exitcode})"
    record.update(seconds=round(time.monotonic() - start, 1), cpu_s=round(_children_cpu_s() - cpu, 1))
    record["limit_s"] = round(limit)
    return record


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check(dry: bool, total_s: float = TOTAL_S, only: Optional[List[str]] = None) -> dict:
    """Every part in turn, within ``total_s`` seconds in all; the report as a dict."""
    device = "cpu" if dry else "cuda"
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    ctx = Context(device, dry, scratch, TINY if dry else FULL, FULL)
    if dry:  # one layer of each model, and few repeats: the dry run's times mean nothing
        ctx.bench_shapes = [s for i, s in enumerate(TINY) if i in (0, 3, len(TINY) - 1)]
        ctx.warmup, ctx.repeats, ctx.warmup_model, ctx.repeats_model = 1, 2, 0, 1
    report = {
        "check": "scripts/gpu_check.py" + (" --dry-run" if dry else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "total_limit_s": total_s,
        "parts": {},
    }
    deadline = time.monotonic() + total_s
    preload()
    for name, fn, cuda_limit in PARTS:
        if only and name not in only and name != "device":
            continue
        limit = min(DRY_LIMIT_S if dry else cuda_limit, deadline - time.monotonic())
        if limit < MIN_PART_S:
            report["parts"][name] = {"status": "skipped: the total time limit was reached", "items": [], "notes": []}
        elif report["parts"].get("device", {}).get("status", "ok") != "ok":
            report["parts"][name] = {"status": "skipped: the device part failed", "items": [], "notes": []}
        else:
            report["parts"][name] = run_part(name, fn, limit, ctx)
        print(f"[gpu_check] {name}: {report['parts'][name]['status']}", file=sys.stderr, flush=True)
    report["seconds"] = round(total_s - (deadline - time.monotonic()), 1)
    shutil.rmtree(scratch, ignore_errors=True)  # the training part's base: 6 GB at full size
    device_part = report["parts"]["device"]["items"]
    report["card"] = device_part[0]["card"] if device_part else None
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry-run", action="store_true", help="the same code on CPU at tiny shapes, in under a minute")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write (default: %(default)s)")
    p.add_argument("--total", type=float, help=f"seconds in all (default {TOTAL_S}; dry run {DRY_TOTAL_S})")
    p.add_argument("--parts", nargs="+", choices=[name for name, *_ in PARTS], help="only these (and device)")
    args = p.parse_args(argv)
    report = check(args.dry_run, args.total or (DRY_TOTAL_S if args.dry_run else TOTAL_S), args.parts)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(summary(report))
    print(f"\n(written to {args.out})")
    if report["parts"]["device"]["status"] != "ok":
        print(f"error: {report['parts']['device']['status']}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
