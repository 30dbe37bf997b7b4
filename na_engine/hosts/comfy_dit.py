"""The ComfyUI host for DiT models (Flux): one ``dit`` block replace per double and single block.

ComfyUI's protocol, which needs no comfy import (current ComfyUI; the 2024 one has no attention override):
* ``patches_replace["dit"][("double_block", i)]`` (or ``("single_block", i)``) is called as
  ``replace(args, {"original_block": fn})`` with args ``img``, ``txt`` (double blocks), ``vec``, ``pe``,
  ``attn_mask`` and ``transformer_options``; ``fn(args)`` runs the block and returns {"img"[, "txt"]};
* ``transformer_options["optimized_attention_override"]`` wraps every attention call made with those
  options, as ``override(func, q, k, v, heads, skip_reshape=True, mask=..., transformer_options=...)``
  with q, k, v (B, H, L, d) after the q/k norms and RoPE, and returns what ``func`` returns, (B, L, H*d).

The block replace hands its block, and only its block, an override that knows the layer, so no other
attention call sees the subjects.  The model wrapper of ``NestedRun`` passes the call's rows down as in
the UNet host; the joint sequence is [text; image], and the trigger positions index the text part.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from ..attention import _merge
from ..joint import joint_layer
from .comfy_patch import ROWS_KEY, NestedRun

OVERRIDE = "optimized_attention_override"
log = logging.getLogger("nested_attention")


class JointAttentionPatch:
    """The ``dit`` replace of one Flux block.  ``key_norm`` is the text stream's key RMSNorm scale (d,) of
    this block's attention; ``previous`` a dit replace registered before ours, which ours calls."""

    def __init__(self, run: NestedRun, key: tuple, key_norm: Tensor, previous: Optional[Callable] = None):
        self.run, self.key, self.key_norm, self.previous = run, key, key_norm, previous
        self._warned = False

    def __deepcopy__(self, memo) -> "JointAttentionPatch":
        """ComfyUI deep-copies model options on every clone: the run, the norm weight and the previous replace
        are shared, never copied (as the UNet patch does)."""
        return copy.copy(self)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        call = options.get(ROWS_KEY, {}).get(self.run.uid)
        if call is not None:
            inner = options.get(OVERRIDE)
            options = {**options, OVERRIDE: self._override(call, args.get("pe"), inner)}
            args = {**args, "transformer_options": options}
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def _override(self, call, pe: Optional[Tensor], inner: Optional[Callable]) -> Callable:
        def nested_joint_attention(func, q, k, v, heads, **kwargs):
            def host(q_, k_, v_, h):  # merged (B, L', H*d) -> the host's own call on (B, H, L', d)
                split = [x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2) for x in (q_, k_, v_)]
                return func(*split, h, **kwargs) if inner is None else inner(func, *split, h, **kwargs)

            if not self._supported(q, kwargs):  # passed on untouched
                return func(q, k, v, heads, **kwargs) if inner is None else inner(func, q, k, v, heads, **kwargs)
            return self._attend(call, pe, _merge(q), _merge(k), _merge(v), heads, host, inner is not None)

        return nested_joint_attention

    def _attend(self, call, pe, q: Tensor, k: Tensor, v: Tensor, heads: int, host, stacked: bool) -> Tensor:
        rotation_at = None if pe is None else (lambda position: pe[0, 0, position])  # pe (1|B, 1, L, d/2, 2, 2)
        binder = self.run.binder
        return joint_layer(binder, call, self.key, q, k, v, heads, self.key_norm, rotation_at, 1e-6, host, stacked)

    def _supported(self, q: Tensor, kwargs: dict) -> bool:
        """Flux's call: (B, H, L, d) in, (B, L, H*d) out, no attention mask.  Anything else is left alone."""
        ok = q.ndim == 4 and kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape")
        ok = ok and kwargs.get("mask") is None
        if not ok and not self._warned:
            self._warned = True
            log.warning(
                "Nested Attention: block %s made an attention call with a mask or another layout than Flux's; "
                "the subjects are not applied there.",
                self.key[:2],
            )
        return bool(ok)


def comfy_dit_layers(diffusion_model: torch.nn.Module) -> list:
    """(dit replace key, width) for every joint attention of a ComfyUI Flux model: double blocks, then single."""
    found = []
    for block_name, attr in (("double_block", "double_blocks"), ("single_block", "single_blocks")):
        for i, block in enumerate(getattr(diffusion_model, attr, [])):
            found.append(((block_name, i, 0), block.hidden_size))
    return found


def text_key_norm(diffusion_model: torch.nn.Module, key: tuple) -> Tensor:
    """The RMSNorm scale (d,) that the text keys of block ``key`` go through: double blocks have a text
    stream of their own (txt_attn), single blocks one norm for the whole sequence."""
    if key[0] == "double_block":
        return diffusion_model.double_blocks[key[1]].txt_attn.norm.key_norm.scale
    return diffusion_model.single_blocks[key[1]].norm.key_norm.scale


def is_dit(diffusion_model: torch.nn.Module) -> bool:
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")
