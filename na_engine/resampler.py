"""Perceiver resampler: CLIP-vision hidden states -> M subject tokens.

Parameter names and shapes follow IP-Adapter Plus's image projection, so its
``image_proj`` weights load unchanged:

    latents (1, M, dim); proj_in (dim, E); proj_out (D, dim); norm_out (D)
    layers.i.0: norm1, norm2 (dim); to_q (heads*dim_head, dim); to_kv (2*heads*dim_head, dim);
               to_out (dim, heads*dim_head)
    layers.i.1: 0 = LayerNorm(dim), 1 = Linear(dim, ff_mult*dim), 3 = Linear(ff_mult*dim, dim)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280  # CLIP-vision hidden width E
    output_dim: int = 768  # token width D
    ff_mult: int = 4

    def to_json(self) -> Dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_state_dict(sd: Dict[str, Tensor], prefix: str = "") -> "ResamplerConfig":
        """Read every size off the weights; IP-Adapter Plus uses dim_head 64."""
        dim = sd[prefix + "latents"].shape[-1]
        depth = len({k[len(prefix) :].split(".")[1] for k in sd if k.startswith(prefix + "layers.")})
        inner = sd[prefix + "layers.0.0.to_q.weight"].shape[0]
        return ResamplerConfig(
            dim=dim,
            depth=depth,
            dim_head=64,
            heads=inner // 64,
            num_queries=sd[prefix + "latents"].shape[1],
            embedding_dim=sd[prefix + "proj_in.weight"].shape[1],
            output_dim=sd[prefix + "proj_out.weight"].shape[0],
            ff_mult=sd[prefix + "layers.0.1.1.weight"].shape[0] // dim,
        )


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor, return_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """x (B, P, dim) image features, latents (B, M, dim) -> (B, M, dim).

        The latents attend to [x ; latents]; with ``return_weights`` the head-averaged
        attention of each latent over the P image features is returned too, (B, M, P).
        """
        x, latents = self.norm1(x), self.norm2(latents)
        b, m, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() * self.dim_head**-0.5, dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, m, -1)
        image_weights = weights[..., : x.shape[1]].mean(1) if return_weights else None
        return self.to_out(out), image_weights


class Resampler(nn.Module):
    def __init__(self, config: ResamplerConfig):
        super().__init__()
        c = config
        self.config = c
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(c.dim, c.dim_head, c.heads),
                    nn.Sequential(
                        nn.LayerNorm(c.dim),
                        nn.Linear(c.dim, c.dim * c.ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(c.dim * c.ff_mult, c.dim, bias=False),
                    ),
                ]
            )
            for _ in range(c.depth)
        )

    def forward(self, features: Tensor, return_weights: bool = False):
        """features (B, P, E) -> tokens (B, M, D); with ``return_weights`` also the
        last layer's token-to-feature attention (B, M, P), for previews."""
        x = self.proj_in(features)
        latents = self.latents.expand(features.shape[0], -1, -1)
        weights = None
        for i, (attn, ff) in enumerate(self.layers):
            out, weights = attn(x, latents, return_weights and i == len(self.layers) - 1)
            latents = latents + out
            latents = latents + ff(latents)
        tokens = self.norm_out(self.proj_out(latents))
        return (tokens, weights) if return_weights else tokens
