"""Shared builders for the na_engine tests: brute-force references, random inputs, fake checkpoints.

Nothing here imports ComfyUI; every model is built with random weights at test time.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from na_engine.attention import NestedBinding
from na_engine.layers import TABLES, Layer
from na_engine.resampler import ResamplerConfig

# --------------------------------------------------------------------------------------------
# attention references


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def reference_plain(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain softmax attention in float64, merged heads."""
    qh, kh, vh = (split_heads(t.double(), heads) for t in (q, k, v))
    d = qh.shape[-1]
    p = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, -1)
    return merge_heads(p @ vh)


def reference_nested(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    """Brute force, float64: materialise every query's own value table, then plain attention.

    For each query q and binding (K~, V~, J, lam, m, w): u(q) = softmax(q K~^T / sqrt(d)) V~ per head,
    each v_j, j in J, becomes v_j + lam*m(q)*(u(q) - v_j), and log(1 + (w - 1) m(q)) is added to the
    outer logit of j.  Several bindings add their changes.  A binding with strength 0 is off.  A decoupled
    binding adds lam*m(q)*u(q) to every query of its rows instead.
    """
    qh, kh, vh = (split_heads(t.double(), heads) for t in (q, k, v))
    b, h, n, d = qh.shape
    t = kh.shape[2]
    values = vh[:, :, None].expand(b, h, n, t, d).clone()  # (B, H, N, T, d): per-query values
    logits = qh @ kh.transpose(-1, -2) / d**0.5  # (B, H, N, T)
    added = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bind in (x for x in bindings if x.strength != 0):
        nk = split_heads(bind.keys.double()[None], heads)[0]  # (H, M, d)
        nv = split_heads(bind.values.double()[None], heads)[0]
        u = torch.softmax(torch.einsum("bhnd,hmd->bhnm", qh, nk) / d**0.5, -1) @ nv  # (B, H, N, d)
        mask = torch.ones(b, n, dtype=torch.float64)
        if bind.query_mask is not None:
            mask = mask * bind.query_mask.double().expand(b, n)
        gate = bind.strength * mask
        for row in range(b):
            if bind.decoupled:
                added[row] += gate[row][None, :, None] * u[row] if bind.where[row].any() else 0
                continue
            for j in bind.where[row].nonzero()[:, 0].tolist():
                values[row, :, :, j] += gate[row][None, :, None] * (u[row] - vh[row, :, None, j])
                logits[row, :, :, j] += torch.log(1 + (bind.trigger_weight - 1) * mask[row])[None]
    p = torch.softmax(logits, -1)  # (B, H, N, T)
    out = torch.einsum("bhnt,bhntd->bhnd", p, values) + added
    return merge_heads(out)


def random_qkv(b: int, n: int, t: int, heads: int, d: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    q = (torch.randn(b, n, c, generator=g) * scale).to(dtype)
    k = (torch.randn(b, t, c, generator=g) * scale).to(dtype)
    v = torch.randn(b, t, c, generator=g).to(dtype)
    return q, k, v


def make_binding(
    b: int,
    t: int,
    c: int,
    m: int,
    positions: Dict[int, Sequence[int]],
    strength: float = 1.0,
    query_mask: Optional[Tensor] = None,
    dtype=torch.float32,
    seed: int = 1,
    key_scale: float = 1.0,
    trigger_weight: float = 1.0,
    decoupled: bool = False,
) -> NestedBinding:
    """positions: row -> trigger positions of that row (rows not listed have none)."""
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(m, c, generator=g) * key_scale).to(dtype)
    values = torch.randn(m, c, generator=g).to(dtype)
    where = torch.zeros(b, t, dtype=torch.bool)
    for row, pos in positions.items():
        where[row, list(pos)] = True
    return NestedBinding(keys, values, where, strength, query_mask, trigger_weight, decoupled)


# --------------------------------------------------------------------------------------------
# adapters and checkpoints

SD15_PLUS = ResamplerConfig(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768)
SDXL_PLUS_VITH = ResamplerConfig(
    dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=1280, output_dim=2048
)
TINY_RESAMPLER = ResamplerConfig(
    dim=32, depth=2, dim_head=8, heads=4, num_queries=4, embedding_dim=24, output_dim=16, ff_mult=2
)


def tiny_layers(widths=(32, 64, 32)) -> List[Layer]:
    """A made-up table: a depth-1 input block, a depth-2 middle block (keys with index), an output block."""
    keys = [("input", 1, 0), ("middle", 0, 0), ("middle", 0, 1), ("output", 3, 0)]
    widths = list(widths) + [widths[-1]] * (len(keys) - len(widths))
    return [Layer(i, f"custom.{i}.attn2", key, w) for i, (key, w) in enumerate(zip(keys, widths))]


class _Windows:
    """Distinct random tensors cut from one random pool: fresh normals for the ~500M parameters of
    a real SDXL IP-Adapter Plus would dominate a test's runtime."""

    def __init__(self, size: int, dtype, seed: int, std: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size + 4096, generator=g) * std).to(dtype)
        self.size, self.count = size, 0

    def __call__(self, *shape, scale: float = 1.0, offset: float = 0.0) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        assert numel <= self.size
        start = self.count * 29 % 4096  # 29 is coprime to 4096: 4096 different windows
        self.count += 1
        out = self.pool[start : start + numel].view(*shape).clone()
        if scale != 1.0 or offset:
            out = (out.float() * scale + offset).to(self.pool.dtype)
        return out


def resampler_state_dict(cfg: ResamplerConfig, dtype=torch.float16, seed: int = 0) -> Dict[str, Tensor]:
    """IP-Adapter Plus image_proj weights at the given config, random."""
    inner = cfg.heads * cfg.dim_head
    biggest = max(
        cfg.dim * cfg.ff_mult * cfg.dim,
        2 * inner * cfg.dim,
        cfg.dim * cfg.embedding_dim,
        cfg.output_dim * cfg.dim,
        cfg.num_queries * cfg.dim,
    )
    w = _Windows(biggest, dtype, seed)

    def r(*shape):
        return w(*shape, scale=shape[-1] ** -0.5)

    def norm(n):
        return w(n, scale=0.1, offset=1.0)

    sd = {
        "latents": r(1, cfg.num_queries, cfg.dim),
        "proj_in.weight": r(cfg.dim, cfg.embedding_dim),
        "proj_in.bias": r(cfg.dim),
        "proj_out.weight": r(cfg.output_dim, cfg.dim),
        "proj_out.bias": r(cfg.output_dim),
        "norm_out.weight": norm(cfg.output_dim),
        "norm_out.bias": r(cfg.output_dim),
    }
    for i in range(cfg.depth):
        p = f"layers.{i}."
        sd.update(
            {
                p + "0.norm1.weight": norm(cfg.dim),
                p + "0.norm1.bias": r(cfg.dim),
                p + "0.norm2.weight": norm(cfg.dim),
                p + "0.norm2.bias": r(cfg.dim),
                p + "0.to_q.weight": r(inner, cfg.dim),
                p + "0.to_kv.weight": r(2 * inner, cfg.dim),
                p + "0.to_out.weight": r(cfg.dim, inner),
                p + "1.0.weight": norm(cfg.dim),
                p + "1.0.bias": r(cfg.dim),
                p + "1.1.weight": r(cfg.dim * cfg.ff_mult, cfg.dim),
                p + "1.3.weight": r(cfg.dim, cfg.dim * cfg.ff_mult),
            }
        )
    return sd


def ip_adapter_plus_parts(base: str, cfg: ResamplerConfig, dtype=torch.float16, seed: int = 0):
    """{"image_proj": ..., "ip_adapter": {"1.to_k_ip.weight": ...}} at the real shapes of `base`."""
    w = _Windows(max(layer.width for layer in TABLES[base]) * cfg.output_dim, dtype, seed + 1, std=cfg.output_dim**-0.5)
    ip = {}
    for layer in TABLES[base]:
        n = 2 * layer.index + 1
        for kv in "kv":
            ip[f"{n}.to_{kv}_ip.weight"] = w(layer.width, cfg.output_dim)
    return {"image_proj": resampler_state_dict(cfg, dtype, seed), "ip_adapter": ip}


def flatten_parts(parts: Dict[str, Dict[str, Tensor]]) -> Dict[str, Tensor]:
    return {f"{group}.{k}": v for group, sd in parts.items() for k, v in sd.items()}
