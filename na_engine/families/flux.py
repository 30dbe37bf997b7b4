"""Flux: a DiT whose double and single blocks' joint attentions take the subjects, text first in the sequence.

In ComfyUI one ``dit`` block replace per block hands the block an attention override (hosts/comfy_dit.py); in
diffusers a NestedJointAttnProcessor serves every block (hosts/diffusers_processor.py); both evaluate
joint.joint_layer.  A subject binds to its trigger's positions in the T5 prompt, the text the joint attention
attends over.  Flux gives every text token position id 0, so the nested keys' rotation is the identity; they go
through the text stream's key RMSNorm (a double block's txt_attn, a single block's one norm).

As ``--base`` of the standalone commands: a diffusers FluxPipeline folder.

    python -m na_engine generate --base FLUX.1-dev/ --clip-vision clip-vit-h/ --adapter flux_adapter.safetensors \
        --prompt "a photo of a bottle on a beach" --subject photos/ --trigger bottle

--cfg is Flux's guidance (the distilled guidance of FLUX.1-dev).  No negative prompt is taken: that would need
true CFG, whose unconditional call the binding could not tell apart.  Training is flow matching, as Flux is
trained: a row's clean latent x0 is the VAE's, shifted and scaled as FluxPipeline decodes, then packed in 2x2
patches.  With noise e it gives x = (1 - s) x0 + s e at sigma s = (t + 1) / 1000, t being the trainer's timestep
draw (so --timestep-bias later favours the noisy end, as for UNets).  The transformer predicts the velocity
e - x0, at Flux's guidance GUIDANCE where it embeds one (FLUX.1-dev).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import NestedAttentionError
from ..hosts.comfy_dit import check_dit_host, comfy_dit_layers, register_dit, text_key_norm
from ..hosts.comfy_tokens import context_positions
from ..layers import Layer, dit_layers
from ..tokens import T5_END, find_trigger
from .base import Family, StepInputs
from .unet import to_image

MAX_TEXT = 512  # FluxPipeline's default max_sequence_length
GUIDANCE = 3.5  # the distilled guidance FLUX.1-dev is sampled at, and diffusers' Flux training scripts train at


@dataclass
class FluxBase:
    """A frozen FluxPipeline, under the names the trainer gives a UNet base's parts."""

    pipe: object
    family: "FluxFamily"

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
        return text_length(self.pipe)


class FluxFamily(Family):
    name, title = "flux", "Flux"
    side_multiple = 16  # the VAE's 8, times the 2x2 patches
    default_size = 1024
    guidance = GUIDANCE
    transformer = "FluxTransformer2DModel"  # the class name of a base folder's transformer/
    pipeline_class = "FluxPipeline"
    encoders_hint = "Load Flux's text encoders with DualCLIPLoader (clip_l and t5xxl, type flux)."

    # -- ComfyUI ---------------------------------------------------------------------------

    def matches_comfy(self, diffusion_model) -> bool:
        return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")

    def comfy_layers(self, diffusion_model) -> list:
        return comfy_dit_layers(diffusion_model)

    def check_comfy(self, diffusion_model, has_override: bool) -> None:
        check_dit_host(diffusion_model, has_override, self.title)

    def comfy_positions(self, clip, tokens: dict, trigger: str, text: str) -> List[int]:
        return context_positions(clip, tokens, [("t5xxl", T5_END)], trigger, text, self.encoders_hint)

    def register(self, patched, run, layers: list) -> None:
        diffusion = patched.model.diffusion_model
        register_dit(patched, run, layers, lambda key: text_key_norm(diffusion, key))

    # -- diffusers -------------------------------------------------------------------------

    def matches_folder(self, path: str, config: Optional[str] = None) -> bool:
        return transformer_config(path).get("_class_name") == self.transformer

    def folder_layers(self, path: str, config: Optional[str] = None) -> List[Layer]:
        """One joint attention per double block, then per single block."""
        cfg = transformer_config(path)
        width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        return dit_layers(int(cfg["num_layers"]), int(cfg["num_single_layers"]), width)

    def context_width(self, path: str, config: Optional[str], layers: List[Layer]) -> int:
        return layers[0].width  # the joint attention's: the nested keys stand beside the projected text keys

    def load(self, path: str, config: Optional[str], dtype) -> FluxBase:
        """The frozen pipeline of a local folder (nothing is downloaded)."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval()
        return FluxBase(pipe, self)

    def denoise(self, unet, noisy: Tensor, timesteps: Tensor, context: Tensor, added: Optional[dict]) -> Tensor:
        """noisy (B, N, C*4) packed latents, timesteps the sigmas (B,), context the T5 states (B, L, D); ``added``
        holds pooled_projections, txt_ids, img_ids and guidance."""
        return unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context, **added).sample

    def grid(self, noisy: Tensor) -> tuple:
        side = int(round(noisy.shape[1] ** 0.5))  # the trainer's images are square
        return (side, side)

    def step_inputs(self, base, latents, noise, timesteps, captions, resolution, dtype) -> StepInputs:
        """Flow-matching noising of the packed latents, the velocity target, T5 and CLIP text."""
        vae, device = base.vae, latents.device
        x0 = pack(latents - vae.config.shift_factor * vae.config.scaling_factor)  # (z - shift) * scale, as Flux's
        noise = pack(noise)
        sigmas = (timesteps.float() + 1) / base.scheduler.config.num_train_timesteps  # (B,)
        s = sigmas[:, None, None]
        noisy = ((1 - s) * x0 + s * noise).to(dtype)
        context, pooled, text_ids = base.pipe.encode_prompt(
            captions, None, device=device, max_sequence_length=base.text_length
        )
        h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
        added = {"pooled_projections": pooled, "txt_ids": text_ids, "img_ids": image_ids(h, w, device)}
        if base.unet.config.guidance_embeds:
            added["guidance"] = torch.full((len(captions),), GUIDANCE, device=device)
        return StepInputs(noisy, sigmas.to(dtype), context, added, noise - x0, trigger_rows, pack)

    def pipeline(self, base: FluxBase, device):
        return base.pipe

    def check_call(self, negative: str, size: int, pipe) -> None:
        if negative:
            raise NestedAttentionError(
                f"{self.title} takes no negative prompt here (it would need true CFG, whose unconditional call the "
                "subjects could not be kept out of). Drop --negative, or the catalogue's negative column."
            )
        factor = 2 * pipe.vae_scale_factor  # pixels per image token
        if size % factor:
            raise NestedAttentionError(f"--size must be a multiple of {factor} on this {self.title} model, not {size}.")

    def trigger_mask(self, base: FluxBase, pipe, prompt: str, trigger: str, cfg: float) -> Tensor:
        return trigger_where(pipe.tokenizer_2, prompt, trigger, base.text_length)

    def sample(self, pipe, prompt, negative, steps, cfg, size, generator) -> Tensor:
        return pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=generator,
            output_type="latent",
            max_sequence_length=text_length(pipe),
        ).images  # (1, N, C*4)

    def latent_grid(self, pipe, size: int) -> tuple:
        return (size // (2 * pipe.vae_scale_factor),) * 2

    def decode(self, base: FluxBase, latents: Tensor, size: int):
        """Packed latents -> PIL image, through the VAE's scaling and shift as FluxPipeline decodes."""
        vae = base.vae
        x = unpack(latents, size // base.pipe.vae_scale_factor) / vae.config.scaling_factor + vae.config.shift_factor
        return to_image(vae.decode(x.to(vae.dtype)).sample[0])


def text_length(pipe) -> int:
    """The T5 tokens a prompt is padded to: the pipeline's default, or its tokenizer's limit where lower."""
    return min(MAX_TEXT, int(pipe.tokenizer_2.model_max_length))


def transformer_config(path: str) -> dict:
    """The config of a diffusers folder's transformer/, or {} where it has none."""
    file = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def trigger_where(tokenizer, prompt: str, trigger: str, length: int) -> Tensor:
    """(1, length) bool: the trigger's positions in the prompt's T5 tokens, padded as the pipeline pads them."""
    ids = tokenizer([prompt], padding="max_length", max_length=length, truncation=True).input_ids[0]
    where = torch.zeros(1, length, dtype=torch.bool)
    where[0, find_trigger([ids], tokenizer(trigger, add_special_tokens=False).input_ids, trigger, prompt)] = True
    return where


def trigger_rows(base: FluxBase, captions: Sequence[str], triggers: Sequence[str]) -> Tensor:
    """(S, L) bool: each subject's trigger positions in its caption's T5 tokens; a caption without it (dropped,
    or never written) binds nothing."""
    rows: List[Tensor] = []
    for caption, trigger in zip(captions, triggers):
        try:
            rows.append(trigger_where(base.pipe.tokenizer_2, caption, trigger, base.text_length)[0])
        except NestedAttentionError:
            rows.append(torch.zeros(base.text_length, dtype=torch.bool))
    return torch.stack(rows) if rows else torch.zeros(0, base.text_length, dtype=torch.bool)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), C*4): 2x2 patches as tokens, channels first (unpack's inverse)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: Tensor, side: int) -> Tensor:
    """Flux's packed latents (B, (s/2)^2, C*4) -> (B, C, s, s): each token is a 2x2 patch, channels first."""
    b, n, c4 = latents.shape
    half = side // 2
    x = latents.view(b, half, half, c4 // 4, 2, 2)  # (B, h, w, C, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, side, side)


def image_ids(h: int, w: int, device) -> Tensor:
    """(h*w, 3) position ids of the image tokens, (0, row, column) as FluxPipeline makes them."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).float()


FLUX = FluxFamily()
