"""The attn2 replace ComfyUI calls, and the state its layers share.

ComfyUI's protocol, which needs no comfy import:
* an attn2 replace is called as ``patch(q, k, v, extra_options) -> out`` with q, k, v
  already projected, heads merged; ``extra_options`` holds ``n_heads``, ``block``,
  ``block_index``, ``cond_or_uncond``, ``sigmas`` and every transformer_options key;
* a model function wrapper is called as ``wrapper(apply_model, {"input", "timestep",
  "c", "cond_or_uncond"})`` once per model call, with the batch's context in
  ``c["c_crossattn"]``.

A conditioning dict never reaches the layers, so the wrapper finds the batch rows
whose context is exactly this prompt's (ComfyUI may tile a context to a common
length) and passes their trigger positions down in transformer_options.
"""

from __future__ import annotations

import copy
import logging
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..attention import AttentionFn, nested_attention, nested_correction, sdpa_attention
from ..binding import Binder, ModelCall, Placement
from ..capture import AttentionCapture
from ..errors import NestedAttentionError
from ..subjects import Subject

ROWS_KEY = "nested_attention_rows"
log = logging.getLogger("nested_attention")


class NestedRun:
    """State shared by every layer patch of one Nested Attention Patch node."""

    def __init__(
        self,
        subjects: Sequence[Subject],
        positions: Sequence[Sequence[int]],
        context: Tensor,
        strength: float = 1.0,
        sigma_range: Tuple[float, float] = (float("inf"), 0.0),
        base_attention: AttentionFn = sdpa_attention,
        capture: Optional[AttentionCapture] = None,
        trigger_weight: float = 1.0,
        text: str = "",
    ):
        self.subjects, self.text = list(subjects), text
        self.positions = [torch.tensor(sorted(p), dtype=torch.long) for p in positions]
        self.context = context  # (1, L, D): the conditioning this node's prompt encoded to
        self.strength, self.trigger_weight = strength, trigger_weight
        self.sigma_start, self.sigma_end = sigma_range
        self.base_attention = base_attention
        self.capture = capture
        self.uid = uuid.uuid4().hex
        self.binder = Binder()
        self._contexts: Dict[tuple, Tensor] = {}
        self._warned = False

    @property
    def fired(self) -> Dict[tuple, int]:
        """Layer key -> model calls in which it bound at least one row."""
        return self.binder.fired

    # -- per model call -------------------------------------------------------------------

    def bind_rows(
        self, context: Optional[Tensor], sigmas: Tensor, latent_hw: Tuple[int, int], halves: int = 1
    ) -> Optional[ModelCall]:
        """The call's rows whose context is this prompt (tiled r times) and whose sigma is in range."""
        if context is None or context.shape[1] % self.context.shape[1]:
            return None
        reps = context.shape[1] // self.context.shape[1]
        ours = self._context_like(context).repeat(1, reps, 1)
        rows = (context == ours).flatten(1).all(1)
        sig = sigmas.reshape(-1).to(rows.device).float()
        if sig.numel() == rows.numel():
            rows &= (sig <= self.sigma_start) & (sig >= self.sigma_end)
        if not bool(rows.any()):
            return None
        length = self.context.shape[1]
        placements = []
        for subject, pos in zip(self.subjects, self.positions):
            where = torch.zeros(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, T)
            cols = (pos[None] + length * torch.arange(reps)[:, None]).flatten().to(context.device)
            where[rows.nonzero()[:, 0][:, None], cols[None]] = True
            placements.append(Placement(subject, where, self.strength, self.trigger_weight))
        return ModelCall(placements, latent_hw, self.capture, halves)

    def wrapper(self, previous: Optional[Callable] = None) -> Callable:
        """The model function wrapper that tells the layers which rows to bind."""

        def nested_attention_rows(apply_model, args):
            c = dict(args["c"])
            options = dict(c.get("transformer_options", {}))
            halves = len(args.get("cond_or_uncond") or [0])  # ComfyUI stacks one chunk of the batch per entry
            call = self.bind_rows(c.get("c_crossattn"), args["timestep"], tuple(args["input"].shape[-2:]), halves)
            if self.capture is not None:
                self.capture.step(float(args["timestep"].max()), options.get("sample_sigmas"))
            self._warn_if_unmatched(call, args.get("cond_or_uncond", []))
            options[ROWS_KEY] = {**options.get(ROWS_KEY, {}), self.uid: call}
            c["transformer_options"] = options
            args = {**args, "c": c}
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **c)

        return nested_attention_rows

    def _context_like(self, context: Tensor) -> Tensor:
        key = (str(context.device), context.dtype)
        if key not in self._contexts:
            self._contexts[key] = self.context.to(context.device, context.dtype)
        return self._contexts[key]

    def _warn_if_unmatched(self, call: Optional[ModelCall], cond_or_uncond: Sequence[int]) -> None:
        if call is None and 0 in cond_or_uncond and not self._warned and not self.fired:
            self._warned = True
            log.warning(
                "Nested Attention: no positive batch row carries the prompt of this Nested Attention Patch. "
                "Sample with the CONDITIONING output of the same node (conditioning nodes that change the "
                "text embedding, such as ConditioningAverage or ConditioningConcat, make it unrecognisable)."
            )


class NestedAttentionPatch:
    """One cross-attention layer's replace.  Stacks on a replace that was there before
    (``previous``) and accepts later ones through ``add()``, the protocol
    IPAdapter_plus, InstantID and PuLID use: ``callback(out, q, k, v, extra_options,
    **kwargs)`` returns a term added to the output while sigma_end <= sigma <= sigma_start."""

    def __init__(self, run: NestedRun, key: tuple, previous: Optional[Callable] = None):
        self.run, self.key, self.previous = run, key, previous
        self.callback: List[Callable] = []
        self.kwargs: List[dict] = []

    def add(self, callback: Callable, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __deepcopy__(self, memo) -> "NestedAttentionPatch":
        """ComfyUI deep-copies model options on every clone.  The weights, caches and
        the previous replace are shared, never copied; only the list of added callbacks
        is new, so an add() on one clone does not leak into the model it came from."""
        clone = copy.copy(self)
        clone.callback, clone.kwargs = list(self.callback), [dict(k) for k in self.kwargs]
        return clone

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        heads = extra_options["n_heads"]
        layer_key = _layer_key(extra_options)
        call = extra_options.get(ROWS_KEY, {}).get(self.run.uid)
        bound = self.run.binder.bindings(call, layer_key, q) if call is not None else []
        bindings = [b for _, b in bound]
        if not bindings:
            out = self._base(q, k, v, extra_options)
        elif self.previous is None:
            out = nested_attention(q, k, v, heads, bindings, base_attention=self.run.base_attention)
        else:
            out = self._base(q, k, v, extra_options) + nested_correction(q, k, v, heads, bindings).to(q.dtype)
        if bound:
            self.run.binder.record(layer_key, call, q, k, heads, bound)
        return self._callbacks(out, q, k, v, extra_options)

    def _base(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.run.base_attention(q, k, v, extra_options["n_heads"])

    def _callbacks(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        if not self.callback:
            return out
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else float("inf")
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs.get("sigma_end", float("-inf")) <= sigma <= kwargs.get("sigma_start", float("inf")):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out


def _layer_key(extra_options: dict) -> tuple:
    block = extra_options.get("block")
    return (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else ("", 0, 0)


def check_one_text(existing: Dict[tuple, Callable], run: NestedRun) -> None:
    """A second Patch whose text differs from an earlier one's would silently drop the earlier subjects: the
    sampler's positive rows carry one text, and a Patch binds only rows carrying its own.  Same texts stack."""
    for patch in existing.values():
        while patch is not None:
            ours = isinstance(getattr(patch, "run", None), NestedRun)  # a UNet layer's or a DiT block's patch
            if ours and not _same(patch.run.context, run.context):
                first = patch.run
                triggers = ", ".join(repr(s.trigger) for s in first.subjects)
                raise NestedAttentionError(
                    f"This model already carries a Nested Attention Patch for the text {first.text!r} "
                    f"(subjects {triggers}). A second Patch with another text ({run.text!r}) would drop those "
                    "subjects, since the sampler's positive prompt can carry only one text. Put all subjects in one "
                    "Multi-Subject Combine and use one Patch whose text holds every trigger word."
                )
            patch = getattr(patch, "previous", None)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def plan_registration(
    existing: Dict[tuple, Callable], layers: Sequence[tuple]
) -> List[Tuple[tuple, tuple, Optional[Callable]]]:
    """For each (block, id, index) layer: the key to register under and the replace to stack on.

    ComfyUI looks up (block, id, index) first, then (block, id).  Where a replace is
    already registered we take its key, so ours is the one called and it calls the old
    one.  Otherwise blocks of depth one get (block, id), as IPAdapter_plus registers
    SD1.5 layers, so an adapter applied after us finds our patch and add()s to it.
    """
    depth: Dict[tuple, int] = {}
    for block, block_id, index in layers:
        depth[(block, block_id)] = max(depth.get((block, block_id), 0), index + 1)
    plan = []
    for layer in layers:
        short = layer[:2]
        if layer in existing:
            plan.append((layer, layer, existing[layer]))
        elif short in existing:
            plan.append((layer, short if depth[short] == 1 else layer, existing[short]))
        else:
            plan.append((layer, short if depth[short] == 1 else layer, None))
    return plan


def register_unet(patched, run: NestedRun, layers: Sequence[tuple]) -> None:
    """One attn2 replace per layer of the ModelPatcher ``patched``, stacked on any registered before
    (``plan_registration``), and the model wrapper that hands each call's rows down."""
    options = patched.model_options
    existing = options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    check_one_text(existing, run)
    for layer, key, previous in plan_registration(existing, layers):
        patched.set_model_attn2_replace(NestedAttentionPatch(run, layer, previous), *key)
    patched.set_model_unet_function_wrapper(run.wrapper(options.get("model_function_wrapper")))
