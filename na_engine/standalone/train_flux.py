"""The trainer's Flux side: a diffusers FluxPipeline folder as ``--base`` of `python -m na_engine train`.

Flow matching, as Flux is trained. A row's clean latent x0 is the VAE's, shifted and scaled as FluxPipeline
decodes, then packed in 2x2 patches. With noise e it gives x = (1 - s) x0 + s e at sigma s = (t + 1) / 1000,
t being the trainer's timestep draw (so --timestep-bias later favours the noisy end, as for UNets). The
transformer predicts the velocity e - x0, at Flux's guidance GUIDANCE where it embeds one (FLUX.1-dev). The
subjects bind to their trigger's T5 positions, as the generator binds them (flux.trigger_where).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import Tensor

from ..errors import NestedAttentionError
from . import flux
from .train import NestedDenoiser, StepInputs, training_latents

GUIDANCE = 3.5  # the distilled guidance FLUX.1-dev is sampled at, and diffusers' Flux training scripts train at


@dataclass
class FluxBase:
    """A frozen FluxPipeline, under the names the trainer gives a UNet base's parts."""

    pipe: object

    @property
    def unet(self):  # the denoiser the adapter's processors sit in
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def text_length(self) -> int:
        return min(flux.MAX_TEXT, int(self.pipe.tokenizer_2.model_max_length))


def load(path: str, dtype: torch.dtype) -> FluxBase:
    return FluxBase(flux.load_pipeline(path, dtype))


class FluxDenoiser(NestedDenoiser):
    """NestedDenoiser around a Flux transformer: noisy (B, N, C*4) packed latents, timesteps the sigmas (B,),
    context the T5 states (B, L, D); ``added`` holds pooled_projections, txt_ids, img_ids and guidance."""

    def denoise(self, noisy: Tensor, timesteps: Tensor, context: Tensor, added: dict) -> Tensor:
        return self.unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context, **added).sample

    @staticmethod
    def grid(noisy: Tensor) -> tuple:
        side = int(round(noisy.shape[1] ** 0.5))  # the trainer's images are square
        return (side, side)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), C*4): 2x2 patches as tokens, channels first (flux.unpack's inverse)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device) -> Tensor:
    """(h*w, 3) position ids of the image tokens, (0, row, column) as FluxPipeline makes them."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).float()


def trigger_rows(base: FluxBase, captions: Sequence[str], triggers: Sequence[str]) -> Tensor:
    """(S, L) bool: each subject's trigger positions in its caption's T5 tokens; a caption without it (dropped,
    or never written) binds nothing."""
    rows: List[Tensor] = []
    for caption, trigger in zip(captions, triggers):
        try:
            rows.append(flux.trigger_where(base.pipe.tokenizer_2, caption, trigger, base.text_length)[0])
        except NestedAttentionError:
            rows.append(torch.zeros(base.text_length, dtype=torch.bool))
    return torch.stack(rows) if rows else torch.zeros(0, base.text_length, dtype=torch.bool)


def step_inputs(run, posterior, r, captions: List[str]) -> StepInputs:
    """A Flux micro-batch: flow-matching noising of the packed latents, the velocity target, T5 and CLIP text."""
    base, device = run.base, run.device
    vae = base.vae
    latents = training_latents(posterior, r.latent_eps.to(device), run.sample_latents, vae)  # scaled, unshifted
    x0 = pack(latents - vae.config.shift_factor * vae.config.scaling_factor)  # (z - shift) * scale, as Flux's
    noise = pack(r.noise.to(device))
    sigmas = (r.timesteps.to(device).float() + 1) / base.scheduler.config.num_train_timesteps  # (B,)
    s = sigmas[:, None, None]
    noisy = ((1 - s) * x0 + s * noise).to(run.frozen_dtype)
    context, pooled, text_ids = base.pipe.encode_prompt(
        captions, None, device=device, max_sequence_length=base.text_length
    )
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
    added = {"pooled_projections": pooled, "txt_ids": text_ids, "img_ids": image_ids(h, w, device)}
    if base.unet.config.guidance_embeds:
        added["guidance"] = torch.full((len(captions),), GUIDANCE, device=device)
    return StepInputs(noisy, sigmas.to(run.frozen_dtype), context, added, noise - x0, trigger_rows, pack)
