"""The ComfyUI host for DiT models (Flux, Chroma, SD3, Qwen-Image): one ``dit`` block replace per joint block.

ComfyUI's protocol, which needs no comfy import (current ComfyUI; the 2024 one has no attention override):
* ``patches_replace["dit"][("double_block", i)]`` (or ``("single_block", i)``) is called as
  ``replace(args, {"original_block": fn})`` with args ``img``, ``txt`` (double blocks), ``vec``, ``pe`` (where
  the model has RoPE), ``attn_mask`` and ``transformer_options``; ``fn(args)`` runs the block;
* ``transformer_options["optimized_attention_override"]`` wraps every attention call made with those
  options, as ``override(func, q, k, v, heads, [mask,] **kwargs)`` after the q/k norms and RoPE, and returns
  what ``func`` returns, (B, L, H*d).  Flux and Chroma pass q, k, v (B, H, L, d) with ``skip_reshape=True``;
  SD3 and Qwen-Image pass them merged, (B, L, H*d) (SD3 its v as (B, L, H, d); Qwen-Image its mask
  positionally).

The block replace hands its block, and only its block, an override that knows the layer, so no other
attention call sees the subjects; within the block the override serves the first call, the joint attention
(an SD3.5 MMDiT-X block's image-only second attention passes through).  The model wrapper of ``NestedRun``
passes the call's rows down as in the UNet host; the joint sequence is [text; image], and the trigger positions
index the text part.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..attention import _merge
from ..errors import NestedAttentionError
from ..joint import joint_layer
from .comfy_patch import ROWS_KEY, NestedRun, check_one_text

OVERRIDE = "optimized_attention_override"
log = logging.getLogger("nested_attention")


class JointAttentionPatch:
    """The ``dit`` replace of one joint block.  ``key_norm`` is the text stream's key RMSNorm scale (d,) of this
    block's attention (None: no key norm), ``eps`` its epsilon; ``merged``: the block calls attention with q, k, v
    merged (B, L, H*d), else (B, H, L, d); ``previous`` a dit replace registered before ours, which ours calls."""

    def __init__(
        self,
        run: NestedRun,
        key: tuple,
        key_norm: Optional[Tensor],
        previous: Optional[Callable] = None,
        eps: float = 1e-6,
        merged: bool = False,
    ):
        self.run, self.key, self.key_norm, self.previous = run, key, key_norm, previous
        self.eps, self.merged = eps, merged
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
        served = []  # the block's first attention call is its joint attention; later ones pass through

        def nested_joint_attention(func, q, k, v, heads, *rest, **kwargs):
            def original(q_, k_, v_, h):  # the host's own call (and any override set before ours)
                if inner is None:
                    return func(q_, k_, v_, h, *rest, **kwargs)
                return inner(func, q_, k_, v_, h, *rest, **kwargs)

            def host(q_, k_, v_, h):  # merged (B, L', H*d) -> the host's call in the layout the block makes it in
                if not self.merged:
                    q_, k_, v_ = (x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2) for x in (q_, k_, v_))
                return original(q_, k_, v_, h)

            if served or not self._supported(q, rest, kwargs):  # passed on untouched
                return original(q, k, v, heads)
            served.append(True)
            q, k, v = (x.flatten(2) if self.merged else _merge(x) for x in (q, k, v))  # (B, L, H*d) each
            return self._attend(call, pe, q, k, v, heads, host, inner is not None)

        return nested_joint_attention

    def _attend(self, call, pe, q: Tensor, k: Tensor, v: Tensor, heads: int, host, stacked: bool) -> Tensor:
        rotation_at = None if pe is None else (lambda position: rotation(pe, position))
        binder = self.run.binder
        return joint_layer(binder, call, self.key, q, k, v, heads, self.key_norm, rotation_at, self.eps, host, stacked)

    def _supported(self, q: Tensor, rest: tuple, kwargs: dict) -> bool:
        """The family's joint attention call: (B, H, L, d) with skip_reshape (Flux, Chroma), or merged (B, L, H*d)
        (SD3, Qwen-Image), in; (B, L, H*d) out; no attention mask.  Anything else is left alone."""
        mask = rest[0] if rest else kwargs.get("mask")
        layout = (
            q.ndim == 3 and not kwargs.get("skip_reshape")
            if self.merged
            else q.ndim == 4 and kwargs.get("skip_reshape")
        )
        ok = layout and not kwargs.get("skip_output_reshape") and mask is None
        if not ok and not self._warned:
            self._warned = True
            log.warning(
                "Nested Attention: block %s made an attention call with a mask or another layout than its joint "
                "attention's; the subjects are not applied there.",
                self.key[:2],
            )
        return bool(ok)


def rotation(pe: Tensor, position: int) -> Tensor:
    """The rotary matrices (d/2, 2, 2) of one sequence position, from the ``pe`` a block is handed: Flux's
    (1|B, 1, L, d/2, 2, 2), Qwen-Image's (1|B, L, 1, d/2, 2, 2); the first row's (positions are the rows')."""
    return pe.reshape(pe.shape[0], -1, *pe.shape[-3:])[0, position]


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


def register_dit(
    patched,
    run: NestedRun,
    layers: Sequence[tuple],
    key_norm: Callable[[tuple], Optional[Tensor]],
    eps: float = 1e-6,
    merged: bool = False,
) -> None:
    """One dit block replace per layer key of the ModelPatcher ``patched`` (``key_norm(key)``: the RMSNorm scale the
    block's text keys go through, or None), stacked on any registered before, and the model wrapper of ``run``."""
    options = patched.model_options
    existing = options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    check_one_text(existing, run)
    for key in layers:
        patch = JointAttentionPatch(run, key, key_norm(key), existing.get(key[:2]), eps, merged)
        patched.set_model_patch_replace(patch, "dit", key[0], key[1])
    patched.set_model_unet_function_wrapper(run.wrapper(options.get("model_function_wrapper")))


def check_override(has_override: bool, title: str) -> None:
    """The subjects act inside a DiT's joint attention through ComfyUI's attention override."""
    if not has_override:
        raise NestedAttentionError(
            f"This ComfyUI is too old for Nested Attention on {title}: it has no attention override "
            "(transformer_options['optimized_attention_override'], added in September 2025), which the subjects "
            f"need inside {title}'s joint attention. Update ComfyUI, or use an SD1.5 or SDXL model."
        )


def check_dit_host(diffusion_model: torch.nn.Module, has_override: bool, title: str) -> None:
    """A Flux-layout DiT (double and single blocks) this ComfyUI can patch: the override, and text first."""
    check_override(has_override, title)
    if any(getattr(block, "flipped_img_txt", False) for block in diffusion_model.double_blocks):
        raise NestedAttentionError(
            "This DiT puts the image before the text in its joint attention (flipped_img_txt); Nested Attention "
            "supports the Flux layout, text first."
        )
