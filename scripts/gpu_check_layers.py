"""The layer parts of scripts/gpu_check.py: exactness against float64, and time, memory and SDPA kernel.

Shapes: B batch rows, N image queries, H heads of width d, T text tokens, M nested tokens.  A cross-attention
layer (SD1.5, SDXL) attends from N queries to T keys; Flux's joint layer from T + N queries to T + N keys, the
subject acting on the N image queries only.  The UNet shapes are CFG batches, B = 2: the trigger is in the
positive (second) row, as the pipelines batch [negative, positive]; Flux runs B = 1.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "tests", "support")):  # na_engine; the tests' random-model builders
    if _path not in sys.path:  # (under pytest both are there, the repository last: ComfyUI's nodes.py wins)
        sys.path.insert(0, _path)
from engine_builders import merge_heads, split_heads  # noqa: E402

from na_engine.attention import METHODS, Case, NestedBinding, choose_method, nested_attention, sdpa_attention  # noqa: E402
from na_engine.joint import joint_nested_attention  # noqa: E402


@dataclass(frozen=True)
class Shape:
    model: str  # sd15, sdxl or flux
    batch: int
    n: int
    heads: int
    d: int
    t: int
    m: int

    @property
    def joint(self) -> bool:
        return self.model == "flux"

    @property
    def keys(self) -> int:
        return self.t + self.n if self.joint else self.t

    @property
    def queries(self) -> int:
        return self.t + self.n if self.joint else self.n

    @property
    def name(self) -> str:
        return f"{self.model} N={self.n} H={self.heads}x{self.d} T={self.t} M={self.m}"


FULL = [
    Shape("sd15", 2, 4096, 8, 40, 77, 16),  # SD1.5's three levels at 512 px: widths 320, 640, 1280 in 8 heads
    Shape("sd15", 2, 1024, 8, 80, 77, 16),
    Shape("sd15", 2, 256, 8, 160, 77, 16),
    Shape("sdxl", 2, 4096, 10, 64, 77, 16),  # SDXL's two attention levels at 1024 px, 16 or 257 nested tokens
    Shape("sdxl", 2, 4096, 10, 64, 77, 257),
    Shape("sdxl", 2, 1024, 20, 64, 77, 16),
    Shape("sdxl", 2, 1024, 20, 64, 77, 257),
    Shape("flux", 1, 4096, 24, 128, 512, 16),  # Flux at 1024 px: 512 T5 tokens, 4096 image tokens
]
TINY = [  # the dry run's: the same models, levels and head widths relative to each other
    Shape("sd15", 2, 64, 2, 8, 12, 4),
    Shape("sd15", 2, 16, 2, 16, 12, 4),
    Shape("sd15", 2, 4, 2, 32, 12, 4),
    Shape("sdxl", 2, 64, 2, 16, 12, 4),
    Shape("sdxl", 2, 64, 2, 16, 12, 9),
    Shape("sdxl", 2, 16, 4, 16, 12, 4),
    Shape("sdxl", 2, 16, 4, 16, 12, 9),
    Shape("flux", 1, 64, 2, 32, 16, 4),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TRIGGER = 5  # the trigger's position in the prompt
EVALUATED = [m for m in METHODS if m != "auto"]  # each one asked for by name; those that cannot run say why


def layer_inputs(shape: Shape, dtype: torch.dtype, device: str, cfg: bool = True, seed: int = 0):
    """q (B, queries, H*d), k, v (B, keys, H*d) and the binding, in ``dtype`` on ``device``.

    The trigger's key leans towards every query (each query shares a random direction per head), so that it
    takes about half of each query's attention: with random keys it would take 1/T, and the nested change would
    be too small to show in the output's error.  ``cfg``: the trigger in the last row only, else in every row."""
    g = torch.Generator().manual_seed(seed)
    b, h, d = shape.batch, shape.heads, shape.d
    lean = torch.randn(h, d, generator=g)  # (H, d)
    q = torch.randn(b, shape.queries, h, d, generator=g) + lean
    k = torch.randn(b, shape.keys, h, d, generator=g)
    v = torch.randn(b, shape.keys, h, d, generator=g)
    # q . k_trigger / sqrt(d) ~ log(keys) + 1 against ~N(0, 2) for the others: about half of the softmax's mass.
    k[:, TRIGGER] = lean * (math.log(shape.keys) + 1) * d**0.5 / lean.pow(2).sum(-1, keepdim=True)
    nk, nv = (torch.randn(shape.m, h * d, generator=g) for _ in range(2))
    where = torch.zeros(b, shape.t, dtype=torch.bool)
    where[-1 if cfg else slice(None), TRIGGER] = True
    q, k, v = (x.flatten(-2).to(device, dtype) for x in (q, k, v))
    return q, k, v, NestedBinding(nk.to(device, dtype), nv.to(device, dtype), where.to(device))


def nested(shape: Shape, q: Tensor, k: Tensor, v: Tensor, bind: NestedBinding, method: str) -> Tensor:
    """The layer with the subject, as the hosts call it: joint attention for Flux, cross-attention otherwise."""
    if shape.joint:
        return joint_nested_attention(q, k, v, shape.heads, [bind], method=method)
    return nested_attention(q, k, v, shape.heads, [bind], method=method)


def auto_method(shape: Shape, q: Tensor, k: Tensor, bind: NestedBinding) -> str:
    """What method "auto" runs for this layer at inference (on the image queries of a joint layer)."""
    image = q[:, shape.t :] if shape.joint else q
    return choose_method("auto", Case(image, [bind], bind.where.any(-1).cpu(), False, k.shape[1]))


def reference(q: Tensor, k: Tensor, v: Tensor, heads: int, bind: NestedBinding, text: int = 0):
    """(nested, plain) attention in float64, straight from the formula rather than the engine's code:
    plain P V, nested P V + lam * sum_{j in J} p_j (u - v_j) with u = softmax(q K~^T / sqrt(d)) V~, for the
    queries from ``text`` on (a joint sequence's text queries stay plain).  Strength only (no query mask, trigger
    weight 1).  Queries go in chunks, so that a Flux layer's probabilities fit in memory."""
    assert bind.query_mask is None and bind.trigger_weight == 1
    qh, kh, vh = (split_heads(x.double(), heads) for x in (q, k, v))  # (B, H, L, d)
    nk, nv = (split_heads(x.double()[None], heads) for x in (bind.keys, bind.values))  # (1, H, M, d)
    where = F.pad(bind.where, (0, kh.shape[2] - bind.where.shape[1])).double()[:, None, None, :]  # (B, 1, 1, keys)
    scale = qh.shape[-1] ** -0.5
    step = max(1, 2**26 // (qh.shape[0] * heads * kh.shape[2]))
    plain, change = [], []
    for i in range(0, qh.shape[2], step):
        qc = qh[:, :, i : i + step]
        p = torch.softmax(qc @ kh.transpose(-1, -2) * scale, -1)  # (B, H, n, keys)
        u = torch.softmax(qc @ nk.transpose(-1, -2) * scale, -1) @ nv  # (B, H, n, d)
        pj = p * where
        delta = bind.strength * (pj.sum(-1, keepdim=True) * u - pj @ vh)
        delta[:, :, : max(0, text - i)] = 0
        plain.append(p @ vh)
        change.append(delta)
    plain_out = torch.cat(plain, 2)
    return merge_heads(plain_out + torch.cat(change, 2)), merge_heads(plain_out)


def relative_error(x: Tensor, ref: Tensor, scale: Optional[Tensor] = None) -> float:
    """||x - ref|| / ||scale|| (Frobenius; scale defaults to ref)."""
    return float((x.double() - ref).norm() / (ref if scale is None else scale).norm())


def exactness(ctx, part) -> None:
    """Every method's relative error against float64 next to stock SDPA's own, per shape and dtype."""
    for shape in ctx.shapes:
        for dtype_name, dtype in DTYPES.items():
            if part.out_of_time(f"{shape.name} {dtype_name}"):
                return
            part.add(_exactness_item(shape, dtype_name, dtype, ctx.device))


@torch.no_grad()
def _exactness_item(shape: Shape, dtype_name: str, dtype: torch.dtype, device: str) -> dict:
    q, k, v, bind = layer_inputs(shape, dtype, device)
    ref, plain = reference(q, k, v, shape.heads, bind, shape.t if shape.joint else 0)
    stock = relative_error(sdpa_attention(q, k, v, shape.heads), plain)
    item = {
        "shape": shape.name,
        **asdict(shape),
        "joint": shape.joint,
        "dtype": dtype_name,
        "stock_error": stock,
        "change_size": relative_error(plain.to(torch.float64), ref),  # ||nested - plain|| / ||nested||
        "auto": auto_method(shape, q, k, bind),
        "methods": {},
    }
    for method in EVALUATED:
        try:
            out = nested(shape, q, k, v, bind, method)
        except ValueError as e:
            item["methods"][method] = {"applies": False, "why": str(e)}
            continue
        error = relative_error(out, ref)
        item["methods"][method] = {
            "applies": True,
            "error": error,
            "x_stock": error / stock if stock > 0 else None,
            "change_error": relative_error(out, ref, ref - plain),  # error of the nested change itself
        }
    return item


def layer_bench(ctx, part) -> None:
    """One layer's time and peak memory against stock SDPA, and the SDPA kernel of each call."""
    for shape in ctx.bench_shapes:
        for dtype_name, dtype in DTYPES.items():
            if part.out_of_time(f"{shape.name} {dtype_name}"):
                return
            part.add(_bench_item(shape, dtype_name, dtype, ctx))


@torch.no_grad()
def _bench_item(shape: Shape, dtype_name: str, dtype: torch.dtype, ctx) -> dict:
    q, k, v, bind = layer_inputs(shape, dtype, ctx.device, cfg=False)
    cfg_bind = layer_inputs(shape, dtype, ctx.device)[3]
    variants = {
        "stock": lambda: sdpa_attention(q, k, v, shape.heads),
        "fused": lambda: nested(shape, q, k, v, bind, "fused"),  # the trigger in every row: the fused call alone
        "closed_form": lambda: nested(shape, q, k, v, bind, "closed_form"),
    }
    if shape.batch > 1:  # a CFG batch: plain attention on both rows, the fused call on the positive one
        variants["fused_cfg"] = lambda: nested(shape, q, k, v, cfg_bind, "fused")
    times = median_times(variants, ctx.warmup, ctx.repeats, ctx.device)
    memory = {name: peak_extra_bytes(fn, ctx.device) for name, fn in variants.items()}
    return {
        "shape": shape.name,
        **asdict(shape),
        "joint": shape.joint,
        "dtype": dtype_name,
        "ms": {name: t * 1e3 for name, t in times.items()},
        "x_stock": {name: t / times["stock"] for name, t in times.items()},
        "peak_extra_mib": {name: None if b is None else b / 2**20 for name, b in memory.items()},
        "memory_x_stock": {
            name: None if b is None or not memory["stock"] else b / memory["stock"] for name, b in memory.items()
        },
        "kernels": {name: sdpa_kernels(variants[name], ctx.device) for name in ("stock", "fused")},
    }


def median_times(
    fns: Dict[str, Callable], warmup: int, repeats: int, device: str, prepare: Optional[Dict[str, Callable]] = None
) -> Dict[str, float]:
    """Seconds per call, the median of ``repeats`` after ``warmup`` calls, the variants interleaved; CUDA events
    on CUDA, the wall clock on CPU.  ``prepare[name]``, if given, runs untimed before each call of ``name``."""
    prepare = prepare or {}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if name in prepare:
                prepare[name]()
            seconds = _timed(fn, device)
            if i >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(s) for name, s in samples.items()}


def _timed(fn: Callable, device: str) -> float:
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def peak_extra_bytes(fn: Callable, device: str) -> Optional[int]:
    """How far CUDA's allocated memory peaks above what was allocated before one call (its output included);
    None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


SDPA_OPS = {  # the dispatcher's op for each SDPA backend, as the profiler names it
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sdpa_kernels(fn: Callable, device: str) -> dict:
    """Which SDPA backend ``fn``'s calls get, two ways: the backend ops the profiler sees with every backend
    allowed (with each call's query shape; on CUDA also the GPU kernels that took longest), and which backends,
    each allowed alone (torch.nn.attention.sdpa_kernel), run the call at all, with the reason of those that
    refuse it (PyTorch's warning, or its error)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        _sync(device)
    events = prof.events()
    chosen = [
        {"backend": SDPA_OPS[e.name], "query": list(e.input_shapes[0]) if e.input_shapes else None}
        for e in events
        if e.name in SDPA_OPS
    ]
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -getattr(e, "device_time_total", 0))
    accepted, refused = [], {}
    for name in BACKENDS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    fn()
                    _sync(device)
                accepted.append(name.lower())
                continue
            except RuntimeError as e:
                error = str(e).strip().splitlines()[0]
        reasons = [str(w.message).strip().splitlines()[0] for w in caught]
        refused[name.lower()] = "; ".join(reasons) or error
    return {
        "chosen": chosen,
        "gpu_kernels": list(dict.fromkeys(e.name[:100] for e in gpu))[:4],
        "accepted_alone": accepted,
        "refused_alone": refused,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
