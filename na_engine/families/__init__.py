"""Model families: one object per architecture, found by one lookup (families/base.py says what each supplies).

    family = comfy_family(model.model.diffusion_model)     # a loaded ComfyUI model
    family = folder_family(path, config)                   # a diffusers base folder (or single file)

Adding a family is one file here, its instance in FAMILIES, and its tests.
"""

from __future__ import annotations

from typing import Optional

from ..errors import NestedAttentionError
from .base import Family, StepInputs
from .chroma import CHROMA
from .flux import FLUX
from .sd3 import SD3
from .unet import SD15, SDXL

FAMILIES = (CHROMA, FLUX, SD3, SDXL, SD15)  # the order of the lookups: the more specific first

__all__ = ["FAMILIES", "Family", "StepInputs", "comfy_family", "folder_family"]


def comfy_family(diffusion_model) -> Family:
    """The family of a ComfyUI model's ``diffusion_model``, or a clear error naming the supported ones."""
    for family in FAMILIES:
        if family.matches_comfy(diffusion_model):
            return family
    raise NestedAttentionError(
        f"Nested Attention cannot patch this model ({type(diffusion_model).__name__}): it supports "
        f"{', '.join(f.title for f in FAMILIES)}."
    )


def folder_family(path: str, config: Optional[str] = None) -> Family:
    """The family of a diffusers base; anything no DiT family claims is read as a UNet's (SD1.5 or SDXL), whose
    configs then say what is wrong with it."""
    family = next(family for family in FAMILIES if family.matches_folder(path, config))
    if not family.diffusers:
        takes = ", ".join(f.title for f in FAMILIES if f.diffusers)
        raise NestedAttentionError(
            f"{path} is a {family.title} base; Nested Attention supports {family.title} in ComfyUI, but train and "
            f"generate take only {takes} bases so far."
        )
    return family
