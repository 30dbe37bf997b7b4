"""Standalone CLIP vision loading and subject encoding for the trainer and the generate command.

transformers is imported inside the functions, so ``import na_engine`` never pulls it in.  The base models are
their family's (na_engine/families/).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..adapter import NestedAdapter, encoder_name, random_adapter
from ..errors import NestedAttentionError
from ..layers import Layer, base_name, describe
from ..resampler import ResamplerConfig
from ..subjects import Subject
from .references import pad_square


@dataclass
class Vision:
    model: object  # transformers CLIPVisionModelWithProjection
    processor: object  # transformers CLIPImageProcessor

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


# -- cheap checks on configs, before any weights are read ------------------------------------


def clip_vision_width(path: str) -> int:
    """Hidden width of a CLIP vision folder (config.json) or file (its patch embedding)."""
    if os.path.isdir(path):
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise NestedAttentionError(f"{path} has no config.json; it is not a CLIP vision model folder.")
        with open(file) as f:
            cfg = json.load(f)
        cfg = cfg.get("vision_config", cfg)
        if "hidden_size" not in cfg or "patch_size" not in cfg:
            raise NestedAttentionError(f"{path} is not a CLIP vision model (its config has no hidden_size/patch_size).")
        return int(cfg["hidden_size"])
    return int(_vision_file_weights(path)["vision_model.embeddings.patch_embedding.weight"].shape[0])


def check_match(
    layers: Sequence[Layer], vision_width: int, adapter: Optional[NestedAdapter], base: str, clip_vision: str
) -> None:
    """An adapter must fit both the base's layers (``base_layers``) and the CLIP vision width."""
    if adapter is None:
        return
    theirs = [(layer.comfy, layer.width) for layer in adapter.layers]
    if theirs != [(layer.comfy, layer.width) for layer in layers]:
        raise NestedAttentionError(
            f"The adapter is made for {describe(adapter.layers)}, but the base {base} is {describe(layers)}."
        )
    if adapter.config.embedding_dim != vision_width:
        raise NestedAttentionError(
            f"The adapter reads {encoder_name(adapter.config.embedding_dim)} features (width "
            f"{adapter.config.embedding_dim}), "
            f"but the CLIP vision model {clip_vision} gives width {vision_width}. Pass the CLIP vision model the "
            "adapter was made with."
        )


def fresh_config(context_dim: int, vision_width: int, tokens: int = 16, depth: int = 4) -> ResamplerConfig:
    """A new adapter's resampler: reads the CLIP vision width, writes tokens of the base's context width (a UNet's
    cross_attention_dim, a Flux transformer's joint attention width)."""
    ctx = int(context_dim)
    heads = max(1, ctx // 64)
    return ResamplerConfig(
        dim=ctx, depth=depth, dim_head=64, heads=heads, num_queries=tokens, embedding_dim=vision_width, output_dim=ctx
    )


# -- loading ---------------------------------------------------------------------------------


def load_vision(path: str, dtype: torch.dtype = torch.float32) -> Vision:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    width = clip_vision_width(path)
    if os.path.isdir(path):
        model = CLIPVisionModelWithProjection.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        size = model.config.image_size
        has_processor = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
        processor = CLIPImageProcessor.from_pretrained(path) if has_processor else _processor(size)
    else:
        sd = _vision_file_weights(path)
        patch = sd["vision_model.embeddings.patch_embedding.weight"]
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        side = int(round((positions - 1) ** 0.5)) * patch.shape[-1]
        depth = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
        cfg = CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=depth,
            num_attention_heads={768: 12, 1024: 16, 1280: 16, 1664: 16}.get(width, max(1, width // 64)),
            image_size=side,
            patch_size=patch.shape[-1],
            projection_dim=sd["visual_projection.weight"].shape[0],
            hidden_act="quick_gelu" if width in (768, 1024) else "gelu",  # OpenAI ViT-B/L vs OpenCLIP ViT-H/bigG
        )
        model = CLIPVisionModelWithProjection(cfg)
        model.load_state_dict(sd, strict=False)
        model.to(dtype)
        processor = _processor(side)
    return Vision(model.requires_grad_(False).eval(), processor)


def _processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _vision_file_weights(path: str) -> dict:
    if not os.path.isfile(path):
        raise NestedAttentionError(f"CLIP vision model not found: {path}")
    from safetensors.torch import load_file

    try:
        sd = load_file(path)
    except Exception as e:
        raise NestedAttentionError(f"Could not read {os.path.basename(path)} as a CLIP vision model: {e}") from e
    if "vision_model.embeddings.patch_embedding.weight" not in sd or "visual_projection.weight" not in sd:
        raise NestedAttentionError(
            f"{os.path.basename(path)} is not a CLIP vision model in transformers layout (vision_model.*, "
            "visual_projection.*). "
            "Pass a transformers CLIP vision folder, or a file such as ComfyUI's clip_vision models."
        )
    return sd


# -- encoding --------------------------------------------------------------------------------


def image_features(vision: Vision, images: Sequence, device) -> Tensor:
    """PIL images -> penultimate CLIP vision hidden states (n, P, E), as the ComfyUI encoder node uses.

    Each photo is first padded to a square of its border colour, as the trainer pads its references, so the
    processor's centre crop never cuts the subject (the node's crop "pad" does the same on grey)."""
    pixels = vision.processor(images=[pad_square(i) for i in images], return_tensors="pt").pixel_values
    return pixel_features(vision, pixels, device)


@torch.no_grad()
def encode_subject(
    adapter: NestedAdapter, vision: Vision, device, images: Sequence, trigger: str, combine: str, mode: str
) -> Subject:
    """PIL photos of one subject -> the subject, as the ComfyUI encode node makes it.

    ``mode`` "decoupled" makes it act as IP-Adapter does (added image attention) instead of nested."""
    import numpy as np

    tokens, weights = adapter.encode(image_features(vision, images, device), combine)
    reference = torch.from_numpy(np.array(images[0].convert("RGB").resize((256, 256)))).float() / 255  # (256, 256, 3)
    attention = weights.float().cpu() if len(images) == 1 else None  # the maps' legend colours one photo
    return Subject(tokens, adapter, trigger, token_attention=attention, reference=reference, mode=mode)


@torch.no_grad()
def pixel_features(vision: Vision, pixels: Tensor, device) -> Tensor:
    """Processed pixel values (n, 3, S, S) -> (n, P, E)."""
    param = next(vision.model.parameters())
    return vision.model(pixels.to(device, param.dtype), output_hidden_states=True).hidden_states[-2]


def adapter_for(layers: Sequence[Layer], resampler: ResamplerConfig, seed: int = 0) -> NestedAdapter:
    """A fresh adapter for a base's layers: random resampler, nested K/V started near zero-mean small weights."""
    return random_adapter(resampler, layers, seed=seed, base=base_name(layers)).train()
