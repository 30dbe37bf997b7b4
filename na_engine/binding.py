"""Which subject acts where in one model call: the layer both hosts share.

A host (ComfyUI's attn2 replace in hosts/comfy_patch.py, diffusers' attention processor
in hosts/diffusers_processor.py) describes each model call as a ``ModelCall`` and, in
every cross-attention layer, does the same three things through one ``Binder``:

    bound = binder.bindings(call, layer_key, q)     # [(subject number, NestedBinding)]
    out = nested_attention(q, k, v, heads, [b for _, b in bound], ...)
    binder.record(layer_key, call, q, k, heads, bound)   # fired counts and the capture

The hosts differ only in their protocol: how they learn the call (a model wrapper in
ComfyUI, a context manager around the UNet call in diffusers) and how they project q/k/v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .attention import NestedBinding, subject_maps
from .capture import AttentionCapture
from .errors import NestedAttentionError
from .layers import ComfyKey
from .masks import query_mask
from .subjects import Subject

Bound = List[Tuple[int, NestedBinding]]  # (the subject's number in the call, its binding at one layer)


@dataclass
class Placement:
    """One subject in one model call."""

    subject: Subject
    where: Tensor  # (B, T) bool: the trigger positions of each batch row; none in rows it must not touch
    strength: float = 1.0  # multiplies the subject's own strength
    trigger_weight: float = 1.0  # multiplies the outer attention the trigger positions receive


@dataclass
class ModelCall:
    """Everything the layers of one UNet call need to know."""

    placements: Sequence[Placement]
    latent_hw: Tuple[int, int]
    capture: Optional[AttentionCapture] = None
    halves: int = 1  # stacked batch halves (unconditional, conditional): latent images = rows / halves


class Binder:
    """State the layers of one host install share: region masks per token grid, and how
    often each layer bound at least one row (``fired``, layer key -> calls)."""

    def __init__(self):
        self.fired: Dict[ComfyKey, int] = {}
        self._masks: Dict[tuple, Tuple[Tensor, Tensor]] = {}  # -> (the mask, its rows at one grid)

    def bindings(self, call: ModelCall, key: ComfyKey, q: Tensor) -> Bound:
        """Each placed subject's binding at the layer ``key``; subjects whose adapter lacks the layer are left out."""
        out = []
        for i, placement in enumerate(call.placements):
            subject = placement.subject
            layer = subject.adapter.layer_index(key)
            if layer is None:
                continue
            keys, values = subject.nested_kv(layer, q.device, q.dtype)
            mask = None if subject.mask is None else self._query_mask(subject.mask, call, q)
            strength = placement.strength * subject.strength
            where = placement.where.to(q.device)
            decoupled = subject.mode == "decoupled"
            out.append((i, NestedBinding(keys, values, where, strength, mask, placement.trigger_weight, decoupled)))
        return out

    def record(self, key: ComfyKey, call: ModelCall, q: Tensor, k: Tensor, heads: int, bound: Bound) -> None:
        """Count the layer as fired if it bound a row, and add its maps to the call's capture."""
        bound = [(i, b) for i, b in bound if bool(b.where.any())]
        if not bound:
            return
        self.fired[key] = self.fired.get(key, 0) + 1
        if call.capture is None:
            return
        for i, binding in bound:
            rows = binding.where.any(-1)
            part = NestedBinding(binding.keys.detach(), binding.values.detach(), binding.where[rows], binding.strength)
            call.capture.add(i, subject_maps(q[rows].detach(), k[rows].detach(), heads, part), call.latent_hw)

    def _query_mask(self, mask: Tensor, call: ModelCall, q: Tensor) -> Tensor:
        """A region mask at a layer's token grid, (1 or B, N), made once per mask and shape."""
        latent_hw = call.latent_hw
        cache_key = (id(mask), latent_hw, q.shape[1], q.shape[0], str(q.device))
        cached = self._masks.get(cache_key)
        if cached is None or cached[0] is not mask:  # the entry holds its mask, so no other mask reuses its id
            cached = self._masks[cache_key] = (
                mask,
                image_rows(query_mask(mask, latent_hw, q.shape[1]), q.shape[0], call.halves).to(q.device),
            )
        return cached[1]


def image_rows(mask: Tensor, batch: int, halves: int = 1) -> Tensor:
    """(1 or B, n) per-image masks -> (1 or batch, n).  Both hosts stack the unconditional and
    conditional halves of a batch of B latent images, so batch row r shows latent image r % B."""
    if mask.shape[0] == 1 or mask.shape[0] == batch:
        return mask
    if batch % mask.shape[0]:
        images = batch // max(1, halves)
        raise NestedAttentionError(
            f"The subject mask holds {mask.shape[0]} images, but {images} latent image{'s' * (images != 1)} "
            "are being sampled; give one mask, or one per latent image."
        )
    return mask[torch.arange(batch, device=mask.device) % mask.shape[0]]
