"""Nested Attention as diffusers attention processors, on the engine's one code path.

A processor replaces one attn2's attention: it projects q/k/v with the module's own
weights, asks the shared ``NestedState`` for this layer's bindings and calls
``nested_attention`` exactly as the ComfyUI patch does.  The nested K~/V~ are made
here from subject tokens with the adapter's to_k/to_v modules, so in training the
gradient reaches the resampler and the nested projections.

No diffusers import: a processor is any callable with the signature below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..adapter import NestedAdapter
from ..attention import NestedBinding, nested_attention, subject_maps
from ..capture import AttentionCapture
from ..errors import NestedAttentionError
from ..layers import Layer
from ..masks import query_mask


@dataclass
class BoundSubject:
    tokens: Tensor  # (M, D) subject tokens; they carry grad in training
    where: Tensor  # (B, T) bool: the trigger positions of each batch row, none in rows it must not touch
    strength: float = 1.0
    mask: Optional[Tensor] = None  # (H, W) region of the generated image, 0..1


class NestedState:
    """What every processor of one UNet reads; set ``subjects`` (and ``latent_hw``) before each UNet call."""

    def __init__(self, adapter: NestedAdapter):
        self.adapter = adapter
        self.subjects: List[BoundSubject] = []
        self.latent_hw: Tuple[int, int] = (0, 0)
        self.closed_form = False  # training sets this: the fused evaluation writes through out= and cannot backprop
        self.capture: Optional[AttentionCapture] = None
        self.fired: Dict[int, int] = {}  # layer index -> calls that bound at least one row

    def bindings(self, layer: int, q: Tensor) -> List[NestedBinding]:
        to_k, to_v = self.adapter.to_k[layer], self.adapter.to_v[layer]
        out = []
        for s in self.subjects:
            tokens = s.tokens.to(q.device, to_k.weight.dtype)
            mask = None if s.mask is None else query_mask(s.mask, self.latent_hw, q.shape[1]).to(q.device)
            out.append(NestedBinding(to_k(tokens).to(q.dtype), to_v(tokens).to(q.dtype), s.where.to(q.device), s.strength, mask))
        return out


class NestedAttnProcessor:
    def __init__(self, state: NestedState, layer: int):
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, temb=None, **kwargs) -> Tensor:
        if attention_mask is not None or hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NestedAttentionError("Nested Attention processors support plain cross-attention only (no attention mask, group or spatial norm).")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, N, H*d), (B, T, H*d) x2
        bindings = self.state.bindings(self.layer, q)
        out = attention_by_rows(q, k, v, attn.heads, bindings, self.state.closed_form)
        if any(bool(b.where.any()) for b in bindings):
            self.state.fired[self.layer] = self.state.fired.get(self.layer, 0) + 1
            if self.state.capture is not None:
                self._capture(q.detach(), k.detach(), attn.heads, bindings)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _capture(self, q: Tensor, k: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> None:
        for i, b in enumerate(bindings):
            rows = b.where.any(-1)
            if bool(rows.any()):
                part = NestedBinding(b.keys.detach(), b.values.detach(), b.where[rows], b.strength)
                self.state.capture.add(i, subject_maps(q[rows], k[rows], heads, part), self.state.latent_hw)


def attention_by_rows(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding], closed_form: bool = False) -> Tensor:
    """nested_attention over row groups that share their set of bindings.

    A training batch binds a different subject in every row; one call with all of them
    would evaluate every subject over every row.  Grouping makes the cost linear.
    """
    if len(bindings) < 2:
        return nested_attention(q, k, v, heads, bindings, method="closed_form" if closed_form else "auto")
    touched = torch.stack([b.where.any(-1) for b in bindings], 1).cpu()  # (B, S)
    groups: Dict[tuple, List[int]] = {}
    for row, key in enumerate(map(tuple, touched.tolist())):
        groups.setdefault(key, []).append(row)
    if len(groups) == 1:
        return nested_attention(q, k, v, heads, bindings, method="closed_form" if closed_form else "auto")
    out = q.new_empty(q.shape)
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        part = [_rows(b, idx) for b, on in zip(bindings, key) if on]
        out[idx] = nested_attention(q[idx], k[idx], v[idx], heads, part, method="closed_form" if closed_form else "auto").to(out.dtype)
    return out


def _rows(b: NestedBinding, idx: Tensor) -> NestedBinding:
    mask = b.query_mask
    if mask is not None and mask.shape[0] > 1:
        mask = mask[idx.to(mask.device)]
    return NestedBinding(b.keys, b.values, b.where[idx], b.strength, mask)


def install(unet, state: NestedState, layers: Sequence[Layer]) -> None:
    """Put a NestedAttnProcessor on every attn2 of ``layers``; other layers keep their processors."""
    processors = dict(unet.attn_processors)
    for layer in layers:
        name = layer.diffusers + ".processor"
        if name not in processors:
            raise NestedAttentionError(f"The adapter's layer {layer.index} ({layer.diffusers}) is not in this UNet; the adapter was made for another base model.")
        processors[name] = NestedAttnProcessor(state, layer.index)
    unet.set_attn_processor(processors)
