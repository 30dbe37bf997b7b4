"""Region masks in image space -> per-query weights at each layer's token grid."""

from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor

from .errors import NestedAttentionError


def token_grid(latent_hw: Tuple[int, int], n: int) -> Tuple[int, int]:
    """The (h, w) grid of a layer with n queries over a latent of latent_hw.

    Each UNet level halves the grid, rounding up (stride-2 convs with padding 1).
    """
    h, w = latent_hw
    while h * w > n and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n:
        raise NestedAttentionError(f"A layer with {n} queries does not fit a {latent_hw[0]}x{latent_hw[1]} latent.")
    return h, w


def query_mask(mask: Tensor, latent_hw: Tuple[int, int], n: int) -> Tensor:
    """mask (H, W) or (B, H, W) in 0..1, any size -> (1 or B, n), resized to the layer's grid."""
    grid = token_grid(latent_hw, n)
    m = mask if mask.ndim == 3 else mask[None]
    m = F.interpolate(m[:, None].float(), size=grid, mode="bilinear", align_corners=False)
    return m.flatten(1).clamp(0, 1)


def upsample(maps: Tensor, latent_hw: Tuple[int, int]) -> Tensor:
    """(B, n[, C]) per-query maps -> (B, C, h, w) at the latent grid."""
    b, n = maps.shape[:2]
    grid = token_grid(latent_hw, n)
    x = maps.reshape(b, n, -1).transpose(1, 2).reshape(b, -1, *grid).float()
    return (
        x if grid == tuple(latent_hw) else F.interpolate(x, size=tuple(latent_hw), mode="bilinear", align_corners=False)
    )
