"""Nested attention inside joint attention, the MM-DiT attention of Flux's double and single blocks.

Shapes: B batch rows, H heads of width d, T text tokens, N image tokens, L = T + N, M nested tokens.
A joint block attends over one sequence [text; image], text first, and every query sees every key.
The trigger's positions lie in the text segment, so for an image query the nested value is the
cross-attention case with all L joint keys as the context:

    out(q) = attn(q, K, V) + lam * m(q) * sum_{j in J} p_j(q) (u(q) - v_j),   u(q) = softmax(q K~^T / sqrt(d)) V~

with p the joint attention probability.  ``na_engine.attention.nested_attention`` evaluates exactly that
on the image queries (trigger mask padded with False over the image keys).  Text queries are left as the
host computes them: the subject acts on the image, as in the UNet, where text tokens make no queries.

The nested keys enter the joint key space as the trigger's own key does: through the key RMSNorm of the
text stream (``key_norm``) and the rotary embedding at the trigger's position (``rotation``).  Flux gives
every text token position id 0, whose rotation is the identity, but the rotation is applied all the same.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionFn, NestedBinding, nested_attention, nested_correction, sdpa_attention


def joint_keys(
    keys: Tensor, heads: int, norm_weight: Optional[Tensor], rotation: Optional[Tensor] = None, eps: float = 1e-6
):
    """Raw nested keys (M, H*d) -> keys in the joint key space: per-head RMSNorm, then RoPE.

    ``norm_weight`` (d,) is the text stream's key-norm scale (None: a model whose keys go through no norm, as
    SD3 Medium's); ``rotation`` (d/2, 2, 2) the rotary matrices of the trigger's position, as Flux's EmbedND lays
    them out (x' = R x for each pair of channels)."""
    m, c = keys.shape
    x = keys.view(m, heads, c // heads).float()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    if rotation is not None:
        pairs = x.reshape(m, heads, -1, 1, 2)  # (M, H, d/2, 1, 2)
        rot = rotation.float()  # (d/2, 2, 2)
        x = (rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]).reshape(m, heads, -1)
    return x.reshape(m, c).to(keys.dtype)


def joint_nested_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    bindings: Sequence[NestedBinding],
    base_attention: AttentionFn = sdpa_attention,
    stacked: bool = False,
    method: str = "auto",
) -> Tensor:
    """Joint attention (B, L, H*d) with each binding's trigger values nested for the image queries.

    Each binding's ``where`` is (B, T) over the text segment, T <= L; its ``query_mask``, if any, is
    (1 or B, N) over the image queries.  Rows no binding touches are ``base_attention``'s, bit for bit.
    ``stacked``: the base is someone else's attention (another patch's override), so the subjects' change
    is added to its output in closed form rather than evaluated together with plain attention.  ``method``:
    nested_attention's evaluation for the image queries."""
    active = [b for b in bindings if b.strength != 0]
    rows = torch.zeros(q.shape[0], dtype=torch.bool)
    for b in active:
        rows |= b.where.any(-1).cpu()
    if not bool(rows.any()):
        return base_attention(q, k, v, heads)
    text = _text_length(active, k.shape[1])
    if bool(rows.all()):
        return _joint(q, k, v, heads, text, active, base_attention, stacked, method)
    out = base_attention(q, k, v, heads).clone()
    index = rows.to(q.device)
    part = [b.rows(rows) for b in active]
    out[index] = _joint(q[index], k[index], v[index], heads, text, part, base_attention, stacked, method)
    return out


def joint_layer(
    binder,
    call,
    key: tuple,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    norm_weight: Optional[Tensor],
    rotation_at: Optional[Callable[[int], Tensor]] = None,
    eps: float = 1e-6,
    base_attention: AttentionFn = sdpa_attention,
    stacked: bool = False,
) -> Tensor:
    """One joint-attention layer as both hosts serve it: the call's bindings at ``key`` (a binding.Binder's),
    their nested keys put into the joint key space, the evaluation, and the record of the layer's maps.

    q, k, v: (B, L, H*d), text first; ``rotation_at(position)``: the rotary matrices (d/2, 2, 2) of a sequence
    position, or None for a model without RoPE; the nested keys take the trigger's first position's."""
    if not call.placements:  # a call that binds no subject (a base image; a training batch that dropped them all)
        return base_attention(q, k, v, heads)
    image = q[:, call.placements[0].where.shape[1] :]  # (B, N, H*d): the queries the subjects act on
    bound = []
    for i, b in binder.bindings(call, key, image):
        rotation = rotation_at(int(b.where.any(0).nonzero()[0, 0])) if rotation_at and bool(b.where.any()) else None
        weight = None if norm_weight is None else norm_weight.to(q.device)
        bound.append((i, replace(b, keys=joint_keys(b.keys, heads, weight, rotation, eps))))
    out = joint_nested_attention(q, k, v, heads, [b for _, b in bound], base_attention, stacked)
    if bound:
        binder.record(key, call, image, k, heads, [(i, widen(b, k.shape[1])) for i, b in bound])
    return out


def widen(binding: NestedBinding, length: int) -> NestedBinding:
    """The binding over the whole joint sequence: its (B, T) trigger mask padded with False to (B, L)."""
    return replace(binding, where=F.pad(binding.where, (0, length - binding.where.shape[1])))


def _joint(q, k, v, heads, text, bindings, base_attention, stacked, method):
    wide = [widen(b, k.shape[1]) for b in bindings]
    image = q[:, text:]  # (B, N, H*d)
    if stacked:
        out = base_attention(q, k, v, heads).clone()
        out[:, text:] += nested_correction(image, k, v, heads, wide).to(out.dtype)
        return out
    words = base_attention(q[:, :text], k, v, heads)  # (B, T, H*d), as the host computes them
    return torch.cat([words, nested_attention(image, k, v, heads, wide, base_attention, method).to(words.dtype)], 1)


def _text_length(bindings: Sequence[NestedBinding], length: int) -> int:
    text = bindings[0].where.shape[1]
    if any(b.where.shape[1] != text for b in bindings) or text >= length:
        raise ValueError(
            f"joint nested attention: trigger masks over {sorted({b.where.shape[1] for b in bindings})} text tokens "
            f"do not fit a joint sequence of {length} tokens (text first, then at least one image token)"
        )
    return text
