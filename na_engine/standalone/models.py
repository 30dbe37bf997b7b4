"""Standalone model loading and encoding for the trainer and the generate command.

diffusers and transformers are imported inside the functions, so ``import na_engine``
never pulls them in.  A base is a diffusers folder (SD1.5 or SDXL layout) or a
single-file checkpoint with ``config`` naming a local diffusers folder for its configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..adapter import NestedAdapter, encoder_name
from ..errors import NestedAttentionError
from ..layers import Layer, base_name, diffusers_layers
from ..resampler import ResamplerConfig
from ..subjects import Subject
from ..tokens import find_trigger


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
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)


@dataclass
class Vision:
    model: object  # transformers CLIPVisionModelWithProjection
    processor: object  # transformers CLIPImageProcessor

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


# -- cheap checks on configs, before any weights are read ------------------------------------


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


def base_layers(path: str, config: Optional[str] = None) -> List[Layer]:
    """The adapter layers a base has, read from its configs: a UNet's cross-attentions, or a Flux
    transformer's joint attentions (standalone/flux.py)."""
    from .flux import flux_layers, is_flux

    if os.path.isdir(path) and is_flux(path):
        return flux_layers(path)
    return diffusers_layers(unet_config(path, config))


def check_match(
    layers: Sequence[Layer], vision_width: int, adapter: Optional[NestedAdapter], base: str, clip_vision: str
) -> None:
    """An adapter must fit both the base's layers (``base_layers``) and the CLIP vision width."""
    if adapter is None:
        return
    theirs = [(layer.comfy, layer.width) for layer in adapter.layers]
    if theirs != [(layer.comfy, layer.width) for layer in layers]:
        from ..layers import describe

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


def image_features(vision: Vision, images: Sequence, device) -> Tensor:
    """PIL images -> penultimate CLIP vision hidden states (n, P, E), as the ComfyUI encoder node uses.

    Each photo is first padded to a square of its border colour, as the trainer pads its references, so the
    processor's centre crop never cuts the subject (the node's crop "pad" does the same on grey)."""
    from .references import pad_square

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
    from ..adapter import random_adapter

    return random_adapter(resampler, layers, seed=seed, base=base_name(layers)).train()
