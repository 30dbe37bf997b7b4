"""Attention-map capture and the paper's two preview views.

For each subject the patch adds, at every layer and step it fires, the outer
probability of the trigger p(q) and the nested softmax over the subject tokens.
Both are brought to the latent grid and summed; the nested part is weighted by
p(q), so it shows token choice where the subject actually is.
"""

from __future__ import annotations

import colorsys
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import SubjectMaps
from .errors import NestedAttentionError
from .masks import upsample


class AttentionCapture:
    def __init__(self, legends: Sequence[Optional[Tensor]]):
        """``legends``: per subject, its reference photo coloured by token (see token_legend), or None."""
        self.legends = list(legends)
        self.outer: Dict[int, Tensor] = {}  # subject -> (B, 1, h, w) summed p(q)
        self.tokens: Dict[int, Tensor] = {}  # subject -> (B, M, h, w) summed p(q) * nested softmax
        self.calls = 0
        self._last_sigma = None
        self._run = None  # the sampling run's schedule tensor, where the host gives one

    def step(self, sigma: float, run: Optional[Tensor] = None) -> None:
        """Called once per model call, so that the maps hold one sampling run.

        ``run`` is the run's sigma schedule (current ComfyUI's transformer_options["sample_sigmas"], a new
        tensor for every sampling): another one starts a new run, even a one-step sampler queued twice or a
        run after one interrupted in its first step. A sigma above the last one does too (older ComfyUI gives
        no schedule; a cached schedule tensor may be reused). A one-step run queued again with the very same
        schedule tensor is the one case neither tells apart."""
        rose = self._last_sigma is not None and sigma > self._last_sigma
        new_run = rose or (run is not None and run is not self._run)
        if new_run:
            self.outer.clear()
            self.tokens.clear()
            self.calls = 0
        self._last_sigma, self._run = sigma, run

    def add(self, subject: int, maps: SubjectMaps, latent_hw: Tuple[int, int]) -> None:
        outer = upsample(maps.outer.detach(), latent_hw)  # (B, 1, h, w)
        tokens = upsample((maps.weights * maps.outer[..., None]).detach(), latent_hw)  # (B, M, h, w)
        self.outer[subject] = _accumulate(self.outer.get(subject), outer.cpu())
        self.tokens[subject] = _accumulate(self.tokens.get(subject), tokens.cpu())
        self.calls += 1

    def render(self, images: Tensor) -> Tensor:
        """images (B, H, W, 3) in 0..1 -> per subject and image, (S*B, H, 3W, 3):
        [where the trigger attends | which token each pixel draws from | the reference, coloured by token]."""
        if not self.outer:
            raise NestedAttentionError(
                "No attention was captured: the sampler never ran the Nested Attention Patch on its prompt. "
                "Sample with the MODEL and CONDITIONING outputs of the same Nested Attention Patch node before "
                "previewing."
            )
        b, h, w, _ = images.shape
        panels = []
        for s in sorted(self.outer):
            outer = _normalise(_resize(self.outer[s], b, h, w))  # (B, 1, H, W)
            tokens = _resize(self.tokens[s], b, h, w)  # (B, M, H, W)
            heat = _heatmap(outer[:, 0])  # (B, H, W, 3)
            token_colour = torch.einsum(
                "bmhw,mc->bhwc", tokens / tokens.sum(1, keepdim=True).clamp_min(1e-12), palette(tokens.shape[1])
            )
            alpha = outer[:, 0, ..., None]
            views = [images * (1 - 0.6 * alpha) + heat * 0.6 * alpha, images * 0.35 + token_colour * 0.65 * alpha]
            legend = self.legends[s] if s < len(self.legends) else None
            views.append(torch.zeros_like(images) if legend is None else _fit(legend, h, w).expand(b, -1, -1, -1))
            panels.append(torch.cat(views, dim=2))
        return torch.cat(panels, dim=0).clamp(0, 1)


def palette(m: int) -> Tensor:
    """m distinct colours, (m, 3)."""
    return torch.tensor([colorsys.hsv_to_rgb(i / max(m, 1), 0.85, 1.0) for i in range(m)], dtype=torch.float32)


def _accumulate(total: Optional[Tensor], new: Tensor) -> Tensor:
    """Sum over calls; rows of a different batch size are folded into their mean."""
    if total is None:
        return new
    if new.shape != total.shape:
        new = (
            new.mean(0, keepdim=True).expand_as(total)
            if new.shape[1:] == total.shape[1:]
            else F.interpolate(new.mean(0, keepdim=True), size=total.shape[-2:]).expand(total.shape[0], -1, -1, -1)
        )
    return total + new


def _resize(maps: Tensor, b: int, h: int, w: int) -> Tensor:
    maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    return maps if maps.shape[0] == b else maps.mean(0, keepdim=True).expand(b, -1, -1, -1)


def _normalise(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return (x - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None, None]


def _heatmap(x: Tensor) -> Tensor:
    """0..1 -> blue-cyan-yellow-red, (..., 3)."""
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.8, 1.0], [1.0, 0.9, 0.0], [1.0, 0.0, 0.0]])
    pos = x.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo)[..., None]
    return stops[lo] * (1 - frac) + stops[lo + 1] * frac


def token_legend(token_attention: Tensor, reference: Tensor) -> Tensor:
    """Colour a reference photo by the token that attends most to each of its patches.

    token_attention (M, P) over CLIP features with a leading class token when P is a
    square plus one; reference (H, W, 3).  Returns (H, W, 3).
    """
    m, p = token_attention.shape
    side = int((p - 1) ** 0.5)
    patches = token_attention[:, 1:] if side * side == p - 1 else token_attention
    side = int(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise NestedAttentionError(f"Token attention over {p} features is not a square grid of patches.")
    owner = patches.argmax(0).view(1, 1, side, side).float()
    h, w, _ = reference.shape
    owner = F.interpolate(owner, size=(h, w), mode="nearest")[0, 0].long()
    return reference * 0.4 + palette(m)[owner] * 0.6


def _fit(image: Tensor, h: int, w: int) -> Tensor:
    """(h0, w0, 3) -> (1, h, w, 3), scaled to fit and centred on black."""
    h0, w0, _ = image.shape
    scale = min(h / h0, w / w0)
    nh, nw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    scaled = F.interpolate(image.permute(2, 0, 1)[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)
    out = torch.zeros(1, 3, h, w)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[:, :, top : top + nh, left : left + nw] = scaled
    return out.permute(0, 2, 3, 1)
