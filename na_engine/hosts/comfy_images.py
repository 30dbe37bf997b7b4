"""Reference photos as ComfyUI passes them, (B, H, W, C) floats in 0..1, made ready for CLIP vision."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import NestedAttentionError

CROP_MODES = ("center", "pad", "squash")
GREY = 0.5  # background for masked-out and padded areas


def prepare_references(images: Tensor, mask: Optional[Tensor] = None, crop: str = "center", size: int = 224) -> Tensor:
    """Check, convert and frame reference photos -> (B, H', W', 3).

    Grayscale and RGBA are converted (RGBA is composited on grey); a subject mask of
    any size is resized to the photos and blanks the background to grey; ``pad`` and
    ``squash`` make the photo square at ``size`` so CLIP's centre crop keeps all of it.
    """
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise NestedAttentionError(
            f"The reference image batch is empty or malformed (shape {shape}); connect one or more photos of the "
            "subject, e.g. from Load Image."
        )
    if crop not in CROP_MODES:
        raise NestedAttentionError(f"crop must be one of {CROP_MODES}, not {crop!r}")
    require_finite(images, "The reference image")
    if mask is not None:
        require_finite(mask, "The subject mask")
    images = to_rgb(images)
    if mask is not None:
        m = resize_mask(mask, images.shape[1], images.shape[2], images.shape[0])[..., None]
        images = images * m + GREY * (1 - m)
    if crop == "pad":
        images = pad_square(images)
    if crop in ("pad", "squash"):
        images = F.interpolate(
            images.movedim(-1, 1), size=(size, size), mode="bicubic", antialias=True, align_corners=False
        ).movedim(1, -1)
    return images.clamp(0, 1)


def require_finite(x: Tensor, what: str) -> None:
    """NaN or infinite pixels would turn the subject tokens, and then the sampled latent, into NaN."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise NestedAttentionError(
            f"{what} holds {int(bad.sum())} NaN or infinite values (of {x.numel()}); the node that made it produced "
            "invalid pixels. Check that node (e.g. a division by zero or a broken file), or reload the image."
        )


def to_rgb(images: Tensor) -> Tensor:
    c = images.shape[-1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(*images.shape[:-1], 3)
    if c == 4:
        alpha = images[..., 3:]
        return images[..., :3] * alpha + GREY * (1 - alpha)
    raise NestedAttentionError(f"Reference images have {c} channels; expected RGB (3), grayscale (1) or RGBA (4).")


def resize_mask(mask: Tensor, h: int, w: int, batch: int) -> Tensor:
    """(H, W) or (B|1, H, W) of any size -> (batch, h, w) in 0..1."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] not in (1, batch):
        raise NestedAttentionError(
            f"The subject mask has shape {tuple(mask.shape)}; expected one mask, or one per reference photo ({batch})."
        )
    if m.shape[1:] != (h, w):
        m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return m.expand(batch, -1, -1).clamp(0, 1)


def pad_square(images: Tensor) -> Tensor:
    b, h, w, c = images.shape
    side = max(h, w)
    out = torch.full((b, side, side, c), GREY, dtype=images.dtype, device=images.device)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = images
    return out


def thumbnail(image: Tensor, size: int = 224) -> Tensor:
    """(H, W, 3) -> (size', size', 3) with the long side at ``size``, for previews."""
    h, w, _ = image.shape
    scale = size / max(h, w)
    out = F.interpolate(
        image.movedim(-1, 0)[None],
        size=(max(1, round(h * scale)), max(1, round(w * scale))),
        mode="bilinear",
        align_corners=False,
    )
    return out[0].movedim(0, -1).clamp(0, 1)
