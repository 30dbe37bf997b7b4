"""SD1.5 and SDXL: UNets whose cross-attention layers (attn2) take the subjects, in ComfyUI and in diffusers.

A base is a diffusers folder (SD1.5 or SDXL layout) or a single-file checkpoint with ``config`` naming a local
diffusers folder for its configs.  The trigger binds to its CLIP token positions (SDXL's two encoders share them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import NestedAttentionError
from ..hosts.comfy_layers import comfy_unet_layers
from ..hosts.comfy_patch import register_unet
from ..hosts.comfy_tokens import context_positions
from ..layers import Layer, diffusers_layers
from ..tokens import EOS, find_trigger
from .base import Family, StepInputs


@dataclass
class Base:
    unet: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler: object
    is_xl: bool
    layers: List[Layer] = field(default_factory=list)

    @property
    def family(self) -> "UNetFamily":
        return SDXL if self.is_xl else SD15

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)


def unet_config(path: str, config: Optional[str] = None) -> dict:
    """The UNet config of a base, read from json only."""
    folder = path if os.path.isdir(path) else config
    if os.path.isfile(path) and not config:
        raise NestedAttentionError(
            f"{os.path.basename(path)} is a single-file checkpoint; reading it offline needs its diffusers configs. "
            "Pass a diffusers folder as --base, or add --base-config with a local diffusers folder of the same model "
            "(e.g. a downloaded stable-diffusion-v1-5 or stable-diffusion-xl-base-1.0 repository)."
        )
    if not os.path.exists(path):
        raise NestedAttentionError(f"Base model not found: {path}")
    file = os.path.join(folder, "unet", "config.json")
    if not os.path.isfile(file):
        raise NestedAttentionError(f"{folder} is not a diffusers model folder (no unet/config.json).")
    if os.path.isfile(path):
        _check_index(folder)
    with open(file) as f:
        return json.load(f)


def _check_index(folder: str) -> None:
    """A single file's config folder must name its components: diffusers builds the pipeline from that list."""
    index_file = os.path.join(folder, "model_index.json")
    index = {}
    if os.path.isfile(index_file):
        with open(index_file) as f:
            index = json.load(f)
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):  # SDXL
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [c for c in needed if c not in index]
    if missing:
        raise NestedAttentionError(
            f"--base-config {folder}: its model_index.json does not name {', '.join(missing)}; a single-file base "
            "takes its components from that list. Pass the model's whole diffusers folder as downloaded (configs "
            "and model_index.json; its weight files are not needed)."
        )


def load_base(path: str, config: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Base:
    """Frozen models in ``dtype``, except the VAE: fp32 always (the SDXL VAE overflows in fp16)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet_cfg = unet_config(path, config)
    folder = path if os.path.isdir(path) else config
    is_xl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    if os.path.isfile(path):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
        extra = {} if is_xl else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=dtype, **extra)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
        unet, vae, scheduler = pipe.unet, pipe.vae.to(torch.float32), DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True)
        encoders = [
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True)
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        if is_xl:
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", torch_dtype=dtype, use_safetensors=True
                )
            )
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for module in [unet, vae] + encoders:
        module.requires_grad_(False).eval()
    return Base(unet, vae, encoders, tokenizers, scheduler, is_xl, diffusers_layers(unet_cfg))


def tokenize(base: Base, prompts: Sequence[str]) -> List[Tensor]:
    """Per tokenizer, the padded ids (B, 77)."""
    return [
        tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in base.tokenizers
    ]


@torch.no_grad()
def encode_prompts(base: Base, prompts: Sequence[str], resolution: int, device) -> Tuple[Tensor, Optional[dict]]:
    """Context (B, 77, C) as the diffusers pipelines make it, and SDXL's added conditions."""
    ids = tokenize(base, prompts)
    if not base.is_xl:
        return base.text_encoders[0](ids[0].to(device))[0], None
    states, pooled = [], None
    for encoder, tok_ids in zip(base.text_encoders, ids):
        out = encoder(tok_ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder's projected pooled output
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device).repeat(
        len(prompts), 1
    )
    return torch.cat(states, -1), {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}


def trigger_where(
    base: Base, prompts: Sequence[str], trigger: Union[str, Sequence[str]], required: bool = True
) -> Tensor:
    """(B, 77) bool: the trigger word's token positions in each prompt (``trigger``: one word, or one per prompt).

    With ``required`` a prompt without the trigger is an error that names it; otherwise its row stays empty.
    """
    ids = tokenize(base, prompts)[0]
    tok = base.tokenizers[0]
    triggers = [trigger] * len(prompts) if isinstance(trigger, str) else list(trigger)
    where = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (prompt, word) in enumerate(zip(prompts, triggers)):
        trigger_ids = tok(word, add_special_tokens=False).input_ids
        try:
            where[row, find_trigger([ids[row].tolist()], trigger_ids, word, prompt)] = True
        except NestedAttentionError:
            if required:
                raise
    return where


class UNetFamily(Family):
    """SD1.5 or SDXL (one class: they differ in their table, their second text encoder and their size)."""

    modes = ("nested", "decoupled")

    def __init__(self, name: str, title: str, xl: bool):
        self.name, self.title, self.xl = name, title, xl
        self.default_size = 1024 if xl else 512

    # -- ComfyUI: attn2 replaces, the first text encoder's positions ------------------------

    def matches_comfy(self, diffusion_model) -> bool:
        """A ComfyUI UNetModel; SDXL's embeds its size conditions ("sequential" classes)."""
        unet = hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks")
        return unet and (getattr(diffusion_model, "num_classes", None) == "sequential") == self.xl

    def comfy_layers(self, diffusion_model) -> list:
        return comfy_unet_layers(diffusion_model)

    def comfy_positions(self, clip, tokens: dict, trigger: str, text: str) -> List[int]:
        return context_positions(clip, tokens, [(None, EOS)], trigger, text, "")

    def register(self, patched, run, layers: list) -> None:
        register_unet(patched, run, layers)

    # -- diffusers -------------------------------------------------------------------------

    def matches_folder(self, path: str, config: Optional[str] = None) -> bool:
        """Any base no DiT family claims is a UNet's (unet_config says what is wrong with it): SDXL's folder has a
        second text encoder.  A single file is read through the diffusers folder of its configs."""
        folder = path if os.path.isdir(path) else config or ""
        return os.path.isdir(os.path.join(folder, "text_encoder_2")) == self.xl

    def folder_layers(self, path: str, config: Optional[str] = None) -> List[Layer]:
        return diffusers_layers(unet_config(path, config))

    def context_width(self, path: str, config: Optional[str], layers: List[Layer]) -> int:
        return int(unet_config(path, config)["cross_attention_dim"])

    def load(self, path: str, config: Optional[str], dtype) -> Base:
        return load_base(path, config, dtype)

    def denoise(self, unet, noisy: Tensor, timesteps: Tensor, context: Tensor, added: Optional[dict]) -> Tensor:
        return unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def grid(self, noisy: Tensor) -> tuple:
        return tuple(noisy.shape[-2:])

    def step_inputs(self, base, latents, noise, timesteps, captions, resolution, dtype) -> StepInputs:
        """The scheduler's noising at the drawn timesteps; epsilon or v target; the trigger in CLIP tokens."""
        schedule = base.scheduler
        context, added = encode_prompts(base, captions, resolution, latents.device)
        noisy = schedule.add_noise(latents, noise, timesteps).to(dtype)
        target = (
            noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, timesteps)
        )
        return StepInputs(noisy, timesteps, context, added, target, _optional_where, lambda weights: weights)

    def pipeline(self, base: Base, device):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = DDIMScheduler.from_config(base.scheduler.config)
        te, tok = base.text_encoders, base.tokenizers
        if base.is_xl:
            return StableDiffusionXLPipeline(base.vae, te[0], te[1], tok[0], tok[1], base.unet, scheduler)
        return StableDiffusionPipeline(
            base.vae, te[0], tok[0], base.unet, scheduler, None, None, requires_safety_checker=False
        )

    def rows(self, cfg: float) -> int:
        return 2 if cfg > 1 else 1  # the pipelines batch [negative, positive] under guidance

    def trigger_mask(self, base: Base, pipe, prompt: str, trigger: str, cfg: float) -> Tensor:
        where = trigger_where(base, [prompt], trigger)  # (1, T)
        return torch.cat([torch.zeros_like(where), where]) if cfg > 1 else where  # only the positive row binds

    def sample(self, pipe, prompt, negative, steps, cfg, size, generator) -> Tensor:
        return pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=size,
            width=size,
            generator=generator,
            output_type="latent",
        ).images  # (1, 4, h, w)

    def latent_grid(self, pipe, size: int) -> tuple:
        return (size // pipe.vae_scale_factor,) * 2

    def decode(self, base: Base, latents: Tensor, size: int):
        """In the VAE's own dtype (the trainer keeps it in fp32 under mixed precision)."""
        vae = base.vae
        return to_image(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample[0])


def to_image(pixels: Tensor):
    """(3, H, W) in [-1, 1] -> a PIL image."""
    from PIL import Image

    return Image.fromarray(((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def _optional_where(base: Base, captions: Sequence[str], triggers: Sequence[str]) -> Tensor:
    return trigger_where(base, captions, triggers, required=False)


SD15 = UNetFamily("sd15", "SD1.5", xl=False)
SDXL = UNetFamily("sdxl", "SDXL", xl=True)
