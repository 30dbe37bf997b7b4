"""Prompt-adherence readings from pixels, fixed before any method is compared.

Each reading uses only the world's vocabulary and geometry (study.world), never a trained model:
- background: the median colour of the top 12% of rows (above every product, see world.SIZES and the floor
  line) and the bottom 6% (below it), read as the nearest named background colour;
- foreground: the pixels farther than FOREGROUND_DISTANCE from that colour;
- placement: the foreground's horizontal centroid, read as the nearest of world.PLACEMENTS;
- size: the foreground's extent along the product's axis (rows, or columns when it lies, holding at least 2
  foreground pixels), nearest of world.SIZES (a lying product's length scaled by world.LYING_LENGTH);
- pose: lying when the foreground's box is wider than tall (a standing product is at most 0.85 as wide as tall);
- cap: the share of cap-coloured pixels in the product's top end (its top rows, or left columns when it lies);
- light: the side toward which neighbouring product pixels of one chromaticity grow brighter (not the cap's).
A reading of a two-product image takes the columns of one product (``columns``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, CAP, CAP_DEPTH, LYING_LENGTH, PLACEMENTS, SIZES

FOREGROUND_DISTANCE = 60.0  # RGB distance (0-441) beyond which a pixel is not background
CAP_DISTANCE = 60.0  # RGB distance within which a pixel is the cap's colour
CAP_SHARE = 0.3  # of the top end's foreground pixels, for a cap
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


def _box(fg: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the foreground's rows and columns holding at least 2 of its pixels."""
    rows, cols = np.nonzero(fg.sum(axis=1) >= 2)[0], np.nonzero(fg.sum(axis=0) >= 2)[0]
    if rows.size == 0 or cols.size == 0:
        return None
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _within(image: Image.Image, columns: tuple[float, float]) -> np.ndarray:
    fg = foreground(image)
    w = fg.shape[1]
    fg[:, : int(round(columns[0] * w))] = False
    fg[:, int(round(columns[1] * w)) :] = False
    return fg


def read_pose(image: Image.Image, columns: tuple[float, float] = (0.0, 1.0)) -> str | None:
    """standing / lying from the foreground box's shape; None when there is no foreground."""
    box = _box(_within(image, columns))
    if box is None:
        return None
    top, bottom, left, right = box
    return "lying" if right - left > bottom - top else "standing"


def read_cap(image: Image.Image, columns: tuple[float, float] = (0.0, 1.0)) -> str | None:
    """cap / bare from the colour of the product's top end; None when there is no foreground."""
    fg = _within(image, columns)
    box = _box(fg)
    if box is None:
        return None
    top, bottom, left, right = box
    if right - left > bottom - top:  # lying: its top is to the left
        end = slice(top, bottom), slice(left, left + max(1, int(round(CAP_DEPTH * (right - left)))))
    else:
        end = slice(top, top + max(1, int(round(CAP_DEPTH * (bottom - top))))), slice(left, right)
    a = _array(image)[end]
    inside = fg[end]
    if not inside.any():
        return "bare"
    capped = np.linalg.norm(a - np.array(CAP, np.float32), axis=-1) < CAP_DISTANCE
    return "cap" if (capped & inside).sum() / inside.sum() > CAP_SHARE else "bare"


def read_light(image: Image.Image, columns: tuple[float, float] = (0.0, 1.0)) -> str | None:
    """left / right: the side from which the product is lit; None when there is no foreground. Shading scales a
    colour, so neighbouring product pixels of one chromaticity (not the cap) are compared: the sum of their
    log-brightness steps along each row says which way the light rises."""
    fg = _within(image, columns)
    a = _array(image)
    fg &= np.linalg.norm(a - np.array(CAP, np.float32), axis=-1) >= CAP_DISTANCE
    brightness = a.sum(-1) + 1.0  # (H, W)
    chroma = a / brightness[..., None]
    pairs = fg[:, :-1] & fg[:, 1:] & (np.abs(chroma[:, 1:] - chroma[:, :-1]).sum(-1) < 0.03)
    if not pairs.any():
        return None
    rise = (np.log(brightness[:, 1:]) - np.log(brightness[:, :-1]))[pairs].sum()
    return "left" if rise < 0 else "right"


def read_placement(image: Image.Image) -> str | None:
    """left / centre / right from the foreground's centroid; None when there is no foreground."""
    fg = foreground(image)
    if not fg.any():
        return None
    x = (np.nonzero(fg)[1].mean() + 0.5) / fg.shape[1]
    return min(PLACEMENTS, key=lambda name: abs(PLACEMENTS[name] - x))


def read_size(image: Image.Image) -> str | None:
    """small / large from the foreground's extent along the product; None when there is no foreground."""
    fg = foreground(image)
    box = _box(fg)
    if box is None:
        return None
    top, bottom, left, right = box
    lying = right - left > bottom - top
    extent = (right - left) / LYING_LENGTH if lying else bottom - top
    return min(SIZES, key=lambda name: abs(SIZES[name] - extent / fg.shape[0]))


def proportion_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (well behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def mean_interval(values, z: float = 1.96) -> tuple[float, float]:
    """95% normal interval of a mean (the mean itself where there is one value)."""
    v = np.asarray(values, dtype=float)
    half = z * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return (float(v.mean() - half), float(v.mean() + half))


def sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as uneven as a:b if each side were a coin flip."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n
    return min(1.0, 2 * tail)


READERS = {"pose": read_pose, "light": read_light, "cap": read_cap}  # world.ATTRIBUTES -> its reading
