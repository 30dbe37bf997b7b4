"""Subjects: encoded reference photos bound to a trigger word, and sets of them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .adapter import NestedAdapter
from .errors import NestedAttentionError

SUBJECT_FORMAT = "nested_attention_subject"
SUBJECT_VERSION = 2  # 2: the adapter fingerprint covers every weight (1 hashed four tensors)


@dataclass(frozen=True)
class Subject:
    tokens: Tensor  # (M, D) subject tokens from the adapter's resampler
    adapter: NestedAdapter
    trigger: str  # an ordinary word of the prompt: "person", "dog", "bottle"
    strength: float = 1.0
    mask: Optional[Tensor] = None  # (H, W) or (B, H, W) region of the generated image, 0..1
    token_attention: Optional[Tensor] = None  # (M, P) each token's attention over the reference features
    reference: Optional[Tensor] = None  # (H, W, 3) thumbnail of the first reference photo, for previews
    source: Dict[str, object] = field(default_factory=dict)  # images, combine, adapter file name...
    mode: str = "nested"  # or "decoupled": IP-Adapter's added image attention (the study's baseline)

    def with_(self, **changes) -> "Subject":
        return replace(self, **changes)

    def nested_kv(self, layer: int, device, dtype) -> Tuple[Tensor, Tensor]:
        """This subject's nested keys and values at one adapter layer, (M, width) each.

        Differentiable while training (the tokens carry grad, from the resampler); otherwise
        computed once per layer, device and dtype and kept with the subject."""
        to_k, to_v = self.adapter.to_k[layer], self.adapter.to_v[layer]
        if torch.is_grad_enabled() and self.tokens.requires_grad:
            tokens = self.tokens.to(device, to_k.weight.dtype)
            return to_k(tokens).to(dtype), to_v(tokens).to(dtype)
        cache = self.__dict__.setdefault("_kv", {})  # not a field: with_() makes a subject with an empty cache
        key = (layer, str(device), dtype)
        if key not in cache:
            k, v = self.adapter.nested_kv(layer, self.tokens)
            cache[key] = (k.to(device, dtype), v.to(device, dtype))
        return cache[key]


class SubjectSet(Tuple[Subject, ...]):
    """An ordered set of subjects whose trigger words differ."""

    def __new__(cls, subjects: Sequence[Subject] = ()):
        seen: Dict[str, Subject] = {}
        for s in subjects:
            key = s.trigger.strip().lower()
            if not key:
                raise NestedAttentionError(
                    "A subject has an empty trigger word; give it a word of the prompt such as 'person' or 'dog'."
                )
            if key in seen:
                raise NestedAttentionError(
                    f"Two subjects use the trigger word {s.trigger!r}. Each subject needs its own word "
                    "(e.g. 'man' and 'woman', or 'dog' and 'cat') so the prompt can place them apart."
                )
            seen[key] = s
        return super().__new__(cls, subjects)


def save_subject(subject: Subject, path: str, adapter_name: str) -> None:
    """Tokens as safetensors; the adapter is referenced by file name and fingerprint, not copied."""
    from safetensors.torch import save_file

    tensors = {"tokens": subject.tokens.detach().float().cpu().contiguous()}
    for name in ("token_attention", "reference"):
        value = getattr(subject, name)
        if value is not None:
            tensors[name] = value.detach().float().cpu().contiguous()
    meta = {
        "format": SUBJECT_FORMAT,
        "version": SUBJECT_VERSION,
        "trigger": subject.trigger,
        "strength": subject.strength,
        "adapter_name": adapter_name,
        "adapter_fingerprint": subject.adapter.fingerprint(),
        "source": subject.source,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={SUBJECT_FORMAT: json.dumps(meta, default=str)})


def read_subject_file(path: str) -> Tuple[Dict[str, Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(SUBJECT_FORMAT, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise NestedAttentionError(f"Could not read subject file {os.path.basename(path)}: {e}") from e
    if meta.get("format") != SUBJECT_FORMAT or "tokens" not in tensors:
        raise NestedAttentionError(
            f"{os.path.basename(path)} is not a saved Nested Attention subject (save one with the Save Nested "
            "Subject node)."
        )
    return tensors, meta


def load_subject(path: str, load_adapter_named: Callable[[str], NestedAdapter]) -> Subject:
    """Rebuild a saved subject; ``load_adapter_named`` finds its adapter by file name."""
    tensors, meta = read_subject_file(path)
    missing = [k for k in ("adapter_name", "adapter_fingerprint", "trigger", "strength") if k not in meta]
    if missing:
        raise NestedAttentionError(
            f"{os.path.basename(path)} lacks {', '.join(missing)} in its metadata: it was not written by the Save "
            "Nested Subject node, or was edited. Encode the subject again and save it."
        )
    adapter = load_adapter_named(meta["adapter_name"])
    if meta.get("version", 1) < SUBJECT_VERSION:
        raise NestedAttentionError(
            f"{os.path.basename(path)} was saved by an earlier version of this extension, whose check of the adapter "
            f"covered only part of its weights. Encode the subject again with {meta['adapter_name']} and save it."
        )
    if adapter.fingerprint() != meta["adapter_fingerprint"]:
        raise NestedAttentionError(
            f"{os.path.basename(path)} was encoded with a different {meta['adapter_name']} than the one found now "
            "(the weights differ). Encode the subject again with this adapter."
        )
    tokens = tensors["tokens"]
    if tokens.shape[-1] != adapter.config.output_dim:
        raise NestedAttentionError(
            f"{os.path.basename(path)} holds tokens of width {tokens.shape[-1]}, but {meta['adapter_name']} uses "
            f"{adapter.config.output_dim}."
        )
    return Subject(
        tokens,
        adapter,
        meta["trigger"],
        float(meta["strength"]),
        None,
        tensors.get("token_attention"),
        tensors.get("reference"),
        dict(meta.get("source", {})),
    )
