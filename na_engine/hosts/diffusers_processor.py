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
from ..joint import joint_layer, joint_nested_attention
from ..layers import Layer, is_joint


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


class NestedJointAttnProcessor:
    """A Flux block's joint attention (diffusers' FluxAttention), the subjects nested for the image queries.

    Double blocks get the image as ``hidden_states`` and the text as ``encoder_hidden_states`` and return both;
    single blocks get [text; image] as ``hidden_states`` and return it.  Projections, q/k norms and the rotary
    embedding are the module's own, applied as diffusers' FluxAttnProcessor applies them."""

    def __init__(self, processors: NestedProcessors, layer: Layer):
        self.processors, self.layer = processors, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NestedAttentionError("Nested Attention's Flux processor supports no attention mask.")
        heads = attn.heads
        q, k, v = (_heads(proj(hidden_states), attn.head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k, key_norm = attn.norm_q(q), attn.norm_k(k), attn.norm_k  # (B, L, H, d) each
        if encoder_hidden_states is not None:  # a double block: its text stream has projections and norms of its own
            e = encoder_hidden_states
            eq, ek, ev = (
                _heads(proj(e), attn.head_dim) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            q, k = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1)
            v, key_norm = torch.cat([ev, v], 1), attn.norm_added_k
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        if cos is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (x.flatten(2) for x in (q, k, v))  # (B, L, H*d)
        out = self._attend(q, k, v, heads, key_norm, cos, sin).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())

    def _attend(self, q, k, v, heads, key_norm, cos, sin) -> Tensor:
        call = self.processors.call
        if call is None:
            return joint_nested_attention(q, k, v, heads, [])
        eps = key_norm.eps if key_norm.eps is not None else torch.finfo(q.dtype).eps
        rotation_at = None if cos is None else (lambda position: _rotation(cos[position], sin[position]))
        binder, key = self.processors.binder, self.layer.comfy
        return joint_layer(binder, call, key, q, k, v, heads, key_norm.weight, rotation_at, eps)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, L, H*d) -> (B, L, H, d)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' Flux RoPE on (B, L, H, d), cos and sin (L, d) repeated per channel pair: each pair (a, b)
    becomes (a cos - b sin, b cos + a sin)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, d/2) each
    turned = torch.stack([-b, a], -1).flatten(-2)
    return (x.float() * cos[None, :, None] + turned * sin[None, :, None]).to(x.dtype)


def _rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' cos and sin (d,) of one position -> its rotary matrices (d/2, 2, 2), in joint_keys' layout."""
    c, s = cos[0::2], sin[0::2]  # (d/2,): one per channel pair
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


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
    kinds = (NestedAttnProcessor, NestedJointAttnProcessor)
    ours = {id(p.processors): p.processors for p in processors.values() if isinstance(p, kinds)}
    if len(ours) == 1 and all(isinstance(processors.get(layer.diffusers + ".processor"), kinds) for layer in layers):
        return next(iter(ours.values()))
    shared = NestedProcessors()
    for layer in layers:
        name = layer.diffusers + ".processor"
        if name not in processors:
            raise NestedAttentionError(
                f"The adapter's layer {layer.index} ({layer.diffusers}) is not in this UNet; "
                "the adapter was made for another base model."
            )
        processors[name] = (NestedJointAttnProcessor if is_joint([layer]) else NestedAttnProcessor)(shared, layer)
    unet.set_attn_processor(processors)
    return shared
