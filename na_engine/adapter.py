"""A nested adapter: the resampler plus one nested to_k/to_v pair per cross-attention layer."""

from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import NestedAttentionError
from .layers import Layer, describe
from .resampler import Resampler, ResamplerConfig

ENCODER_NAMES = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}
FAMILIES = {
    "nested_attention": "Nested Attention adapter",
    "ip_adapter_plus": "IP-Adapter Plus (training-free, experimental)",
}
COMBINE_MODES = ("concat", "average")


def encoder_name(width: int) -> str:
    return ENCODER_NAMES.get(width, f"a vision encoder of width {width}")


class NestedAdapter(nn.Module):
    def __init__(
        self,
        resampler: ResamplerConfig,
        layers: Sequence[Layer],
        family: str = "nested_attention",
        base: str = "custom",
    ):
        super().__init__()
        self.family, self.base, self.layers = family, base, list(layers)
        self.resampler = Resampler(resampler)
        d = resampler.output_dim
        self.to_k = nn.ModuleList(nn.Linear(d, layer.width, bias=False) for layer in self.layers)
        self.to_v = nn.ModuleList(nn.Linear(d, layer.width, bias=False) for layer in self.layers)

    @property
    def config(self) -> ResamplerConfig:
        return self.resampler.config

    def describe(self) -> str:
        c = self.config
        return (
            f"{FAMILIES.get(self.family, self.family)} for {describe(self.layers)}; "
            f"{c.num_queries} tokens of width {c.output_dim} per image from {encoder_name(c.embedding_dim)} features"
        )

    def check_features(self, features: Tensor, source: str = "the CLIP vision model") -> None:
        want = self.config.embedding_dim
        if features.ndim != 3 or features.shape[-1] != want:
            got = features.shape[-1] if features.ndim else "?"
            raise NestedAttentionError(
                f"This adapter expects {encoder_name(want)} features (width {want}), but {source} gives "
                f"{encoder_name(got) if isinstance(got, int) else 'no hidden states'} (width {got}). "
                f"Load the CLIP vision model the adapter was made with ({encoder_name(want)})."
            )

    @torch.no_grad()
    def encode(self, features: Tensor, combine: str = "concat") -> Tuple[Tensor, Tensor]:
        """Penultimate CLIP-vision states of n photos (n, P, E) -> subject tokens and their image attention.

        ``concat`` keeps all n*M tokens, so each query picks among every photo's tokens;
        ``average`` averages the photos into M tokens.  Returns tokens (n*M or M, D) and
        the resampler's last-layer attention of each token over the P features, (n*M or M, P).
        """
        self.check_features(features)
        if combine not in COMBINE_MODES:
            raise NestedAttentionError(f"combine must be one of {COMBINE_MODES}, not {combine!r}")
        param = self.resampler.latents
        tokens, weights = self.resampler(features.to(param.device, param.dtype), return_weights=True)
        if combine == "average":
            return tokens.mean(0), weights.mean(0)
        return tokens.flatten(0, 1), weights.flatten(0, 1)

    @torch.no_grad()
    def nested_kv(self, layer: int, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """Subject tokens (M, D) -> this layer's nested keys and values, (M, width) each."""
        wk, wv = self.to_k[layer].weight, self.to_v[layer].weight
        tokens = tokens.to(wk.dtype)
        return tokens @ wk.t(), tokens @ wv.t()

    def layer_index(self, comfy_key) -> Optional[int]:
        for layer in self.layers:
            if layer.comfy == tuple(comfy_key):
                return layer.index
        return None

    def fingerprint(self) -> str:
        """A short hash of every weight, so a saved subject can tell whether it meets its adapter again.

        Computed once per loaded adapter (about 1 s per GB), again only if a weight is replaced or edited."""
        weights = sorted(self.state_dict().items())
        key = tuple((t.data_ptr(), t._version) for _, t in weights)  # a copy or an in-place edit changes it
        cached = self.__dict__.get("_fingerprint")
        if cached is None or cached[0] != key:
            h = hashlib.sha256()
            for name, t in weights:
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self.__dict__["_fingerprint"] = cached = (key, h.hexdigest()[:16])
        return cached[1]


def random_adapter(
    resampler: ResamplerConfig, layers: Sequence[Layer], seed: int = 0, base: str = "custom"
) -> NestedAdapter:
    """An adapter with reproducible random weights: for tests, benchmarks and training starts."""
    torch.manual_seed(seed)
    adapter = NestedAdapter(resampler, layers, base=base)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.ndim > 1:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return adapter.eval()


def layer_list(layers: Sequence[Layer]) -> List[list]:
    return [layer.to_json() for layer in layers]
