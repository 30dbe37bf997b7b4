"""The fast CPU path: a C++ kernel, csrc/nested_attention_cpu.cpp, built on first use.

It computes a whole nested-attention layer in one pass over the queries, for fp32 CPU
inference and any strengths, masks and subject overlaps (see the source's header).
torch.utils.cpp_extension compiles it once per machine and PyTorch version, in about 20 s,
and caches it under TORCH_EXTENSIONS_DIR (by default ~/.cache/torch_extensions).

It needs an x86-64 CPU with AVX2, a C++ compiler with OpenMP (g++ or clang++, not MSVC)
and ninja (``pip install ninja``).  Without them, or with NA_CPU_KERNEL=0, ``available()``
is False, the log says why once, and the engine uses its PyTorch paths: the same results,
slower on CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("nested_attention")

SOURCE = Path(__file__).parent / "csrc" / "nested_attention_cpu.cpp"
ALIGN = 8  # the kernel's vector width: value widths and column groups are padded to multiples of it
QUERY_BLOCK = 96  # queries per task; their 96 x (T+M) logits stay in cache


def usable(q: Tensor, training: bool = False) -> bool:
    """Whether the kernel applies to this layer's inputs (building it on the first call)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and not training and available()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    reason = _unsupported()
    if reason is None:
        try:
            _build()
        except Exception as e:  # a compiler or linker message: report it, keep the PyTorch path
            reason = f"building it failed: {_first_error(e)}"
    if reason:
        log.warning(
            "nested attention: the fast CPU kernel is off (%s); using the PyTorch path, same results, slower on CPU",
            reason,
        )
    return reason is None


def nested_attention_cpu(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence) -> Tensor:
    """attention.nested_attention's result, (B, N, H*d), for fp32 CPU tensors and NestedBindings."""
    b, n, c = q.shape
    t, d = k.shape[1], c // heads
    text, dv = _round_up(t), _round_up(d)
    starts, ends, stop = [], [], text
    for bind in bindings:
        starts.append(stop)
        stop += _round_up(bind.keys.shape[0])
        ends.append(stop)
    keys_t = q.new_zeros((b, heads, d, stop))  # the scaled keys, transposed: (B, H, d, L)
    values = q.new_zeros((b, heads, stop, dv))  # (B, H, L, dv), zero past d
    bias = torch.full((stop,), float("-inf"))
    keys_t[..., :t] = k.reshape(b, t, heads, d).permute(0, 2, 3, 1) * d**-0.5
    values[:, :, :t, :d] = v.reshape(b, t, heads, d).transpose(1, 2)
    bias[:t] = 0
    trigger = torch.zeros((len(bindings), b, text))
    gate, weight = torch.empty((len(bindings), b, n)), torch.empty((len(bindings), b, n))
    for i, bind in enumerate(bindings):
        m, s = bind.keys.shape[0], starts[i]
        keys_t[..., s : s + m] = bind.keys.float().reshape(m, heads, d).permute(1, 2, 0) * d**-0.5
        values[:, :, s : s + m, :d] = bind.values.float().reshape(m, heads, d).transpose(0, 1)
        bias[s : s + m] = 0
        trigger[i, :, :t] = bind.where.cpu()
        mask = 1.0 if bind.query_mask is None else bind.query_mask.float().cpu().expand(b, n)
        gate[i] = bind.strength * mask
        weight[i] = 1 + (bind.trigger_weight - 1) * mask
    out = torch.ops.nested_attention.forward(
        q if q.stride(-1) == 1 else q.contiguous(),
        keys_t,
        values,
        bias,
        text,
        torch.tensor(starts, dtype=torch.long),
        torch.tensor(ends, dtype=torch.long),
        trigger,
        gate,
        weight,
        QUERY_BLOCK,
    )  # (B, N, H*dv)
    return out if dv == d else out.view(b, n, heads, dv)[..., :d].reshape(b, n, c)


def _first_error(e: Exception) -> str:
    """The compiler's first 'error:' line, else the message's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines if "error:" in line), lines[-1])


def _round_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def _unsupported() -> Optional[str]:
    """Why the kernel cannot be built here, or None."""
    if os.environ.get("NA_CPU_KERNEL", "1") == "0":
        return "NA_CPU_KERNEL=0"
    if os.name == "nt":
        return "it is built with g++ or clang++, and this is Windows"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this is {platform.machine()}"
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return "this CPU lacks AVX2"
    try:  # the ninja wheel ships its binary outside PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        return "ninja is not installed: pip install ninja"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def _build() -> None:
    from torch.utils.cpp_extension import load

    log.info("nested attention: building the CPU kernel (once per machine, about 20 s)")
    load(
        name="na_nested_attention_cpu",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
