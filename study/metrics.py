"""Prompt-adherence readings from pixels, fixed before any method is compared.

Each reading uses only the world's vocabulary and geometry (study.world), never a trained model:
- background: the median colour of the top 12% of rows (above every product, see world.SIZES and the floor
  line) and the bottom 6% (below it), read as the nearest named background colour;
- foreground: the pixels farther than FOREGROUND_DISTANCE from that colour;
- placement: the foreground's horizontal centroid, read as the nearest of world.PLACEMENTS;
- size: the foreground's height (rows holding at least 2 foreground pixels), nearest of world.SIZES.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, PLACEMENTS, SIZES

FOREGROUND_DISTANCE = 60.0  # RGB distance (0-441) beyond which a pixel is not background
_NAMES = list(BACKGROUNDS)
_PALETTE = np.array([BACKGROUNDS[n] for n in _NAMES], np.float32)  # (C, 3)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float32)  # (H, W, 3)


def background_colour(image: Image.Image) -> np.ndarray:
    a = _array(image)
    h = a.shape[0]
    border = np.concatenate([a[: max(1, int(0.12 * h))], a[h - max(1, int(0.06 * h)) :]]).reshape(-1, 3)
    return np.median(border, axis=0)


def read_background(image: Image.Image) -> str:
    """The named background colour nearest to the image's border colour."""
    c = background_colour(image)
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - c, axis=1)))]


def foreground(image: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels that are not the background colour."""
    a = _array(image)
    return np.linalg.norm(a - background_colour(image), axis=-1) > FOREGROUND_DISTANCE


def read_placement(image: Image.Image) -> str | None:
    """left / centre / right from the foreground's centroid; None when there is no foreground."""
    fg = foreground(image)
    if not fg.any():
        return None
    x = (np.nonzero(fg)[1].mean() + 0.5) / fg.shape[1]
    return min(PLACEMENTS, key=lambda name: abs(PLACEMENTS[name] - x))


def read_size(image: Image.Image) -> str | None:
    """small / large from the foreground's height; None when there is no foreground."""
    fg = foreground(image)
    rows = np.nonzero(fg.sum(axis=1) >= 2)[0]
    if rows.size == 0:
        return None
    height = (rows.max() - rows.min() + 1) / fg.shape[0]
    return min(SIZES, key=lambda name: abs(SIZES[name] - height))


def proportion_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (well behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as uneven as a:b if each side were a coin flip."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z test (unpaired: for cells that kept no per-case rows)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = abs(k1 / n1 - k2 / n2) / se
    return math.erfc(z / math.sqrt(2))


def cells_p(a: dict, b: dict, key: str) -> float:
    """two_proportion_p of two evaluation cells' rates ``key`` (a rate times the cell's n is its count)."""
    return two_proportion_p(round(a[key] * a["n"]), a["n"], round(b[key] * b["n"]), b["n"])
