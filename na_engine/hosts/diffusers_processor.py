"""Nested Attention as diffusers attention processors, on the engine's one code path.

A processor replaces one attn2's attention: it projects q/k/v with the module's own
weights, takes this layer's bindings from the shared ``Binder`` and calls
``nested_attention`` exactly as the ComfyUI patch does.  The subjects of a UNet call
are passed per call, as arguments, never left behind:

    processors = install(unet, adapter.layers)
    with processors.bound(ModelCall([Placement(subject, where)], latent_hw)):
        unet(...)

In training the subjects' tokens carry grad, so the nested K~/V~ (made from them with
the adapter's to_k/to_v) pass it on to the resampler and the nested projections.

No diffusers import: a processor is any callable with the signature below.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor

from ..attention import NestedBinding, nested_attention
from ..binding import Binder, ModelCall
from ..errors import NestedAttentionError
from ..layers import Layer


class NestedProcessors:
    """The processors installed on one UNet, and the model call they are serving (if any)."""

    def __init__(self):
        self.binder = Binder()
        self.call: Optional[ModelCall] = None

    @property
    def fired(self) -> Dict[tuple, int]:
        """Layer key (ComfyUI's, as in the layer table) -> UNet calls in which it bound at least one row."""
        return self.binder.fired

    @contextlib.contextmanager
    def bound(self, call: ModelCall) -> Iterator[ModelCall]:
        """Serve ``call`` to every layer for the UNet call(s) inside the block; restored after it."""
        previous, self.call = self.call, call
        try:
            yield call
        finally:
            self.call = previous

    def checkpoint(self, module, *args):
        """Gradient checkpointing for ``unet.enable_gradient_checkpointing(processors.checkpoint)``:
        a block recomputed during the backward pass runs under the call it first ran with."""
        call = self.call
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), self.bound(call))
        )


class NestedAttnProcessor:
    def __init__(self, processors: NestedProcessors, layer: Layer):
        self.processors, self.layer = processors, layer

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb=None,
        **kwargs,
    ) -> Tensor:
        plain = (
            attention_mask is None and hidden_states.ndim == 3 and attn.group_norm is None and attn.spatial_norm is None
        )
        if not plain:
            raise NestedAttentionError(
                "Nested Attention processors support plain cross-attention only (no attention mask, group or spatial "
                "norm)."
            )
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, N, H*d), (B, T, H*d) x2
        call, binder, key = self.processors.call, self.processors.binder, self.layer.comfy
        bound = binder.bindings(call, key, q) if call is not None else []
        out = attention_by_rows(q, k, v, attn.heads, [b for _, b in bound])
        if bound:
            binder.record(key, call, q, k, attn.heads, bound)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def attention_by_rows(q: Tensor, k: Tensor, v: Tensor, heads: int, bindings: Sequence[NestedBinding]) -> Tensor:
    """nested_attention over row groups that share their set of bindings.

    A training batch binds a different subject in every row; one call with all of them
    would evaluate every subject over every row.  Grouping makes the cost linear.
    """
    if len(bindings) < 2:
        return nested_attention(q, k, v, heads, bindings)
    touched = torch.stack([b.where.any(-1) for b in bindings], 1).cpu()  # (B, S)
    groups: Dict[tuple, List[int]] = {}
    for row, key in enumerate(map(tuple, touched.tolist())):
        groups.setdefault(key, []).append(row)
    if len(groups) == 1:
        return nested_attention(q, k, v, heads, bindings)
    out = q.new_empty(q.shape)
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=q.device)
        part = [b.rows(idx) for b, on in zip(bindings, key) if on]
        out[idx] = nested_attention(q[idx], k[idx], v[idx], heads, part).to(out.dtype)
    return out


def install(unet, layers: Sequence[Layer]) -> NestedProcessors:
    """Put a NestedAttnProcessor on every attn2 of ``layers``; other layers keep their processors.
    A UNet that has them already (a trainer's, whose validation generates) keeps them."""
    processors = dict(unet.attn_processors)
    ours = {id(p.processors): p.processors for p in processors.values() if isinstance(p, NestedAttnProcessor)}
    if len(ours) == 1 and all(
        isinstance(processors.get(layer.diffusers + ".processor"), NestedAttnProcessor) for layer in layers
    ):
        return next(iter(ours.values()))
    shared = NestedProcessors()
    for layer in layers:
        name = layer.diffusers + ".processor"
        if name not in processors:
            raise NestedAttentionError(
                f"The adapter's layer {layer.index} ({layer.diffusers}) is not in this UNet; "
                "the adapter was made for another base model."
            )
        processors[name] = NestedAttnProcessor(shared, layer)
    unet.set_attn_processor(processors)
    return shared
