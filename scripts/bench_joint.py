"""Joint-attention layer benchmark at Flux shapes: python scripts/bench_joint.py

Variants, timed side by side in one run (interleaved, median of repeats), B = 1, fp32:
  stock         joint attention over [text; image], F.scaled_dot_product_attention
  nested        na_engine.joint.joint_nested_attention, the trigger bound (method "auto")
  nested_torch  the same with PyTorch ops only (method "statistics")
  decoupled     IP-Adapter's way: stock + attention of the image queries over K~, V~
Shapes: Flux's sequence lengths (T = 512 T5 tokens; N = 1024 or 4096 image tokens, a 512 or 1024 px
image) and head width 128.  On CPU 4 heads (Flux has 24: --heads 24, --device cuda on a GPU).
Peak extra memory per variant is measured in a fresh process (Linux, CPU only), as in bench.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))  # the repository root, for na_engine
from na_engine.attention import NestedBinding, sdpa_attention  # noqa: E402
from na_engine.joint import joint_nested_attention  # noqa: E402

VARIANTS = ("stock", "nested", "nested_torch", "decoupled")
SHAPES = [(512, 1024, 16), (512, 4096, 16), (512, 1024, 64)]  # (T, N, M)
HEAD_DIM, TRIGGER = 128, 7


def variant(name: str, t: int, n: int, m: int, heads: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, t + n, heads * HEAD_DIM, generator=g).to(device) for _ in range(3))
    nk, nv = (torch.randn(m, heads * HEAD_DIM, generator=g).to(device) for _ in range(2))
    where = torch.zeros(1, t, dtype=torch.bool, device=device)
    where[:, TRIGGER] = True
    bind = NestedBinding(nk, nv, where)
    if name == "stock":
        return lambda: sdpa_attention(q, k, v, heads)
    if name == "nested":
        return lambda: joint_nested_attention(q, k, v, heads, [bind])
    if name == "nested_torch":
        return lambda: joint_nested_attention(q, k, v, heads, [bind], method="statistics")
    if name == "decoupled":
        return lambda: (
            sdpa_attention(q, k, v, heads)
            + torch.nn.functional.pad(sdpa_attention(q[:, t:], nk[None], nv[None], heads), (0, 0, t, 0))
        )
    raise ValueError(name)


def time_variants(shape, heads: int, repeats: int, device: str) -> dict:
    fns = {name: variant(name, *shape, heads, device) for name in VARIANTS}
    samples = {name: [] for name in VARIANTS}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_extra_bytes(name: str, shape, heads: int, threads: int) -> int:
    code = (
        "import sys, torch; sys.path.insert(0, %r); import bench, bench_joint as j; torch.set_num_threads(%d);"
        "fn = j.variant(%r, *%r, %d); start = bench.rss('VmRSS'); bench.reset_peak_rss(); fn();"
        "print(bench.rss('VmHWM') - start)"
    ) % (SCRIPTS, threads, name, tuple(shape), heads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench_joint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="only T=512, N=1024, M=16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, B=1, {args.heads} heads of {HEAD_DIM}, fp32, median of {args.repeats}")
    print(f"{'T':>4} {'N':>5} {'M':>3} | " + " | ".join(f"{v:>24}" for v in VARIANTS))
    ratios = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        times = time_variants(shape, args.heads, args.repeats, args.device)
        mems = (
            {v: peak_extra_bytes(v, shape, args.heads, args.threads) for v in VARIANTS} if args.device == "cpu" else {}
        )
        cells = []
        for v in VARIANTS:
            mem = f" {mems[v] / 2**20:6.1f}MB" if mems else ""
            cells.append(f"{times[v] * 1e3:8.2f}ms x{times[v] / times['stock']:4.2f}{mem}".rjust(24))
        print(f"{shape[0]:>4} {shape[1]:>5} {shape[2]:>3} | " + " | ".join(cells))
        ratios.append(times["nested"] / times["stock"])
    print(f"RESULT time_ratio_first_shape={ratios[0]:.3f} worst={max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
