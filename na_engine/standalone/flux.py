"""Flux in the standalone commands: a diffusers FluxPipeline folder as ``--base``.

    python -m na_engine generate --base FLUX.1-dev/ --clip-vision clip-vit-h/ --adapter flux_adapter.safetensors \
        --prompt "a photo of a bottle on a beach" --subject photos/ --trigger bottle

A subject binds to its trigger's positions in the T5 prompt, the text that Flux's joint attention attends
over. The engine's NestedJointAttnProcessor serves every double and single block
(hosts/diffusers_processor.py), the same evaluation as the ComfyUI patch. --cfg is Flux's guidance (the
distilled guidance of FLUX.1-dev). No negative prompt is taken: that would need true CFG, whose
unconditional call the binding could not tell apart.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import List, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..adapter import NestedAdapter
from ..binding import ModelCall, Placement
from ..capture import AttentionCapture, token_legend
from ..errors import NestedAttentionError
from ..hosts.diffusers_processor import install
from ..layers import Layer, dit_layers
from ..subjects import Subject
from ..tokens import find_trigger
from .models import Vision, encode_subject

MAX_TEXT = 512  # FluxPipeline's default max_sequence_length


def is_flux(path: str) -> bool:
    """Whether ``path`` is a diffusers folder whose denoiser is a Flux transformer."""
    return _transformer_config(path).get("_class_name", "").startswith("Flux")


def _transformer_config(path: str) -> dict:
    file = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def flux_layers(path: str) -> List[Layer]:
    """The adapter layers of a Flux folder: one joint attention per double block, then per single block."""
    cfg = _transformer_config(path)
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    return dit_layers(int(cfg["num_layers"]), int(cfg["num_single_layers"]), width)


def load_pipeline(path: str, dtype: torch.dtype):
    """The frozen FluxPipeline of a local folder (nothing is downloaded)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    return pipe


def trigger_where(tokenizer, prompt: str, trigger: str, length: int) -> Tensor:
    """(1, length) bool: the trigger's positions in the prompt's T5 tokens, padded as the pipeline pads them."""
    ids = tokenizer([prompt], padding="max_length", max_length=length, truncation=True).input_ids[0]
    where = torch.zeros(1, length, dtype=torch.bool)
    where[0, find_trigger([ids], tokenizer(trigger, add_special_tokens=False).input_ids, trigger, prompt)] = True
    return where


def unpack(latents: Tensor, side: int) -> Tensor:
    """Flux's packed latents (B, (s/2)^2, C*4) -> (B, C, s, s): each token is a 2x2 patch, channels first."""
    b, n, c4 = latents.shape
    half = side // 2
    x = latents.view(b, half, half, c4 // 4, 2, 2)  # (B, h, w, C, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, side, side)


class FluxGenerator:
    """A FluxPipeline whose transformer runs the engine's nested attention in its joint attentions."""

    def __init__(self, pipe, vision: Vision, adapter: NestedAdapter, device):
        self.pipe, self.vision, self.adapter, self.device = pipe, vision, adapter, device
        self.processors = install(pipe.transformer, adapter.layers) if adapter is not None else None
        self.text_length = min(MAX_TEXT, int(pipe.tokenizer_2.model_max_length))
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def encode(self, images: Sequence, trigger: str, combine: str = "concat", mode: str = "nested") -> Subject:
        if mode != "nested":
            raise NestedAttentionError(
                f"--mode {mode} is not available on Flux: a Flux adapter's subjects act through nested attention."
            )
        return encode_subject(self.adapter, self.vision, self.device, images, trigger, combine, mode)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subject: Union[Subject, Sequence[Subject]],
        seed: int,
        steps: int = 28,
        cfg: float = 3.5,
        size: int = 1024,
        negative: str = "",
        strength: float = 1.0,
        maps: bool = True,
        trigger_weight: float = 1.0,
    ):
        """-> (image, maps panel or None), PIL images, as NestedGenerator's."""
        from PIL import Image

        if negative:
            raise NestedAttentionError(
                "Flux takes no negative prompt here (it would need true CFG, whose unconditional call the subjects "
                "could not be kept out of). Drop --negative, or the catalogue's negative column."
            )
        factor = 2 * self.pipe.vae_scale_factor  # pixels per image token
        if size % factor:
            raise NestedAttentionError(f"--size must be a multiple of {factor} on this Flux model, not {size}.")
        subjects = [subject] if isinstance(subject, Subject) else list(subject)
        tokenizer = self.pipe.tokenizer_2
        placements = [
            Placement(s, trigger_where(tokenizer, prompt, s.trigger, self.text_length), strength, trigger_weight)
            for s in subjects
        ]
        legends = [
            None if s.token_attention is None else token_legend(s.token_attention, s.reference) for s in subjects
        ]
        capture = self.capture = AttentionCapture(legends) if maps else None
        call = ModelCall(placements, (size // factor,) * 2, capture, 1)
        with self.processors.bound(call) if self.processors is not None else contextlib.nullcontext():
            latents = self.pipe(
                prompt,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=cfg,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
                max_sequence_length=self.text_length,
            ).images  # (1, N, C*4)
        image = self.decode(latents, size // self.pipe.vae_scale_factor)
        panel = None
        if maps:
            pixels = torch.from_numpy(np.array(image)).float()[None] / 255  # (1, H, W, 3)
            panel = Image.fromarray((capture.render(pixels)[0].numpy() * 255).round().astype("uint8"))
        return image, panel

    @torch.no_grad()
    def decode(self, latents: Tensor, side: int):
        """Packed latents -> PIL image, through the VAE's scaling and shift as FluxPipeline decodes."""
        from PIL import Image

        vae = self.pipe.vae
        x = unpack(latents, side) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x.to(vae.dtype)).sample[0].float()  # (3, H, W) in [-1, 1]
        return Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
