"""Cross-attention layer benchmark at SDXL shapes: python scripts/bench.py

Variants, timed side by side in one run (interleaved, median of repeats):
  stock         plain attention, F.scaled_dot_product_attention
  nested        our nested attention, the trigger bound in every row (method "auto":
                the C++ CPU kernel where it is built)
  nested_torch  the same without the C++ kernel (method "statistics", PyTorch ops only)
  nested_cfg    "auto" with CFG's batch, the trigger in the positive row only
  ip_adapter    IP-Adapter's decoupled attention: attn(q, K, V) + attn(q, K_ip, V_ip)
  materialised  the naive form: a per-query value tensor (B, H, N, T, d), then p @ V(q)
Peak extra memory is measured per variant in a fresh subprocess (Linux): the rise of the
peak resident set size above the resident size with the inputs built, over one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))  # the repository root, for na_engine
from na_engine import cpu_kernel  # noqa: E402
from na_engine.attention import NestedBinding, nested_attention, sdpa_attention  # noqa: E402

VARIANTS = ("stock", "nested", "nested_torch", "nested_cfg", "ip_adapter", "materialised")
SHAPES = [(n, h, t, m) for n, h in ((4096, 10), (1024, 20)) for t in (77, 154) for m in (16, 64, 257)]
BATCH, HEAD_DIM, TRIGGER = 2, 64, 5


def inputs(n: int, h: int, t: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, length, h * HEAD_DIM, generator=g) for length in (n, t, t))
    nk, nv = (torch.randn(m, h * HEAD_DIM, generator=g) for _ in range(2))
    where = torch.zeros(BATCH, t, dtype=torch.bool)
    where[:, TRIGGER] = True
    return q, k, v, nk, nv, where


def variant(name: str, n: int, h: int, t: int, m: int) -> Callable[[], torch.Tensor]:
    q, k, v, nk, nv, where = inputs(n, h, t, m)
    if name == "stock":
        return lambda: sdpa_attention(q, k, v, h)
    if name == "nested":
        return lambda: nested_attention(q, k, v, h, [NestedBinding(nk, nv, where)])
    if name == "nested_torch":
        return lambda: nested_attention(q, k, v, h, [NestedBinding(nk, nv, where)], method="statistics")
    if name == "nested_cfg":
        positive_only = where.clone()
        positive_only[1:] = False
        return lambda: nested_attention(q, k, v, h, [NestedBinding(nk, nv, positive_only)])
    if name == "ip_adapter":
        kb, vb = nk.expand(BATCH, -1, -1), nv.expand(BATCH, -1, -1)
        return lambda: sdpa_attention(q, k, v, h) + sdpa_attention(q, kb, vb, h)
    if name == "materialised":
        return lambda: materialised(q, k, v, h, nk, nv, where)
    raise ValueError(name)


def materialised(q, k, v, heads, nk, nv, where):
    """The formulation we avoid: every query gets its own copy of all T values."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, H, N, T)
    u = F.scaled_dot_product_attention(
        qh,
        nk.view(1, -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1),
        nv.view(1, -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1),
    )
    values = vh[:, :, None].expand(-1, -1, n, -1, -1).clone()  # (B, H, N, T, d)
    rows, cols = where.nonzero(as_tuple=True)
    values[rows, :, :, cols] = u[rows]
    return torch.einsum("bhnt,bhntd->bhnd", p, values).transpose(1, 2).reshape(b, n, c)


def time_variants(shape: Tuple[int, int, int, int], repeats: int) -> Dict[str, float]:
    fns = {name: variant(name, *shape) for name in VARIANTS}
    samples: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_extra_bytes(name: str, shape: Tuple[int, int, int, int], threads: int) -> int:
    """Run one variant once in a fresh interpreter and report how far its peak RSS rose above
    the RSS it started from.  (ru_maxrss would not do: Linux carries it across fork and exec,
    so a child would inherit this process's peak.)"""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import bench as b; torch.set_num_threads(%d);"
        "fn = b.variant(%r, *%r); start = b.rss('VmRSS'); b.reset_peak_rss(); fn(); print(b.rss('VmHWM') - start)"
    ) % (SCRIPTS, threads, name, tuple(shape))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="only N=4096, T=77, M=16")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"torch {torch.__version__}, {args.threads} threads, B={BATCH}, d={HEAD_DIM}, fp32, median of {args.repeats}")
    print(f"C++ CPU kernel: {'built' if cpu_kernel.available() else 'off (see the warning above)'}")
    print(f"{'N':>5} {'H':>3} {'T':>4} {'M':>4} | " + " | ".join(f"{v:>22}" for v in VARIANTS))
    first = {}
    for shape in shapes:
        times = time_variants(shape, args.repeats)
        mems = {} if args.no_memory else {v: peak_extra_bytes(v, shape, args.threads) for v in VARIANTS}
        cells = []
        for v in VARIANTS:
            mem = f" {mems[v] / 2**20:7.1f}MB" if mems else ""
            cells.append(f"{times[v] * 1e3:7.2f}ms x{times[v] / times['stock']:4.2f}{mem}".rjust(22))
        print(f"{shape[0]:>5} {shape[1]:>3} {shape[2]:>4} {shape[3]:>4} | " + " | ".join(cells))
        first.setdefault("times", times)
        first.setdefault("mems", mems)
    times, mems = first["times"], first["mems"]
    mem_ratio = f"{mems['materialised'] / max(mems['nested'], 1):.1f}" if mems else "n/a"
    print(f"RESULT time_ratio_m16={times['nested'] / times['stock']:.3f} mem_ratio_vs_materialised={mem_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
