"""Tiny random-weight diffusers models, written to folders at test time (never committed).

A diffusers base folder (UNet, VAE, CLIP text encoder + a hand-made BPE tokenizer,
DDPM scheduler) and a CLIP vision folder, small enough that a training step on
one CPU core takes well under a second.
"""

import json
import os

from study.base import write_tokenizer

WORDS = ["a", "photo", "of", "dog", "bottle", "on", "the", "beach", "in", "snow", "red", "sks", "person", "cat"]


def make_base(folder: str, seed: int = 0) -> str:
    """A tiny SD1.5-shaped diffusers folder: 2 levels, 1 layer per block, cross-attention width 32."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    tok_dir = os.path.join(folder, "tokenizer")
    write_tokenizer(tok_dir, WORDS, max_length=16)  # each of WORDS one token; other words fall back to letters
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text = CLIPTextModel(text_config(tokenizer, 32))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    write_index(folder, "StableDiffusionPipeline", "DDPMScheduler", safety_checker=[None, None])
    return folder


TINY_XL_UNET = dict(  # SDXL's layout at tiny widths: cross-attention at the second level only (2 layers there)
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,  # six time ids x 8 + the pooled text (16)
)


def make_base_xl(
    folder: str, seed: int = 0, unet: dict = TINY_XL_UNET, text=(16, 16), tokens: int = 16, vae=None, dtype=None
) -> str:
    """An SDXL-shaped diffusers folder: two 2-layer text encoders of widths ``text`` (context = their sum, pooled
    text = the second's width) over ``tokens`` positions, pooled text and time ids through the added embedding.
    Tiny by default; scripts/gpu_check.py passes SDXL's UNet and VAE configs (``vae``: AutoencoderKL's keyword
    arguments, default tiny_vae's) and a ``dtype`` for the UNet and text encoders (default fp32).  Built on the
    caller's default device: under ``with torch.device("cuda"):`` a full-size one takes seconds."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(seed)

    def save(model, sub):
        (model if dtype is None else model.to(dtype)).save_pretrained(os.path.join(folder, sub))

    save(UNet2DConditionModel(**unet), "unet")
    (tiny_vae() if vae is None else AutoencoderKL(**vae)).save_pretrained(os.path.join(folder, "vae"))
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer(os.path.join(folder, sub), WORDS, max_length=tokens)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    save(CLIPTextModel(text_config(tokenizer, text[0])), "text_encoder")
    save(CLIPTextModelWithProjection(text_config(tokenizer, text[1], projection_dim=text[1])), "text_encoder_2")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        os.path.join(folder, "scheduler")
    )
    write_index(
        folder,
        "StableDiffusionXLPipeline",
        "EulerDiscreteScheduler",
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
    )
    return folder


def tiny_vae():
    """A 2-level AutoencoderKL: 32 px images, 16 px latents of 4 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    )


def text_config(tokenizer, width: int, **more):
    """A 2-layer CLIP text encoder's config of the given width (heads of 64 where it is that wide, else 2), for
    this tokenizer and its length."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=max(2, width // 64),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **more,
    )


def write_index(folder: str, pipeline: str, scheduler: str, **more) -> None:
    """model_index.json naming every component, as a downloaded pipeline's does (single-file loading reads it)."""
    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        **more,
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


def make_clip_vision(folder: str, hidden: int = 32, seed: int = 0, image: int = 32, patch: int = 8) -> str:
    """A 2-layer CLIP vision tower with its image processor: tiny by default (32 px images, 8 px patches -> 17
    features); ViT-H/14's width and length with hidden=1280, image=224, patch=14 (257 features)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=max(2, hidden // 64),
            image_size=image,
            patch_size=patch,
            projection_dim=hidden,
        )
    )
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}).save_pretrained(
        folder
    )
    return folder


def make_photos(folder: str, count: int = 4, size: int = 48, seed: int = 0) -> str:
    """Coloured squares on noise, one per file, named photo_<i>.png."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = rng.integers(0, 60, (size, size + 8 * i, 3), dtype=np.uint8)
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(100, 255, 3, dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"photo_{i}.png"))
    return folder


def make_photo_masks(photos: str, folder: str, size: int = 48) -> str:
    """The masks of make_photos' squares (white = subject), named like the photos, for prepare --masks."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(photos)):
        with Image.open(os.path.join(photos, name)) as im:
            mask = Image.new("L", im.size, 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        mask.save(os.path.join(folder, name))
    return folder


TINY_FLUX = dict(  # FluxTransformer2DModel's arguments: 2 heads of 16 (RoPE axes 4+6+6), 1 double, 1 single block
    patch_size=1,
    in_channels=8,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(seed: int = 0):
    """A diffusers FluxTransformer2DModel at tiny widths (TINY_FLUX), text width 32; random weights, its q/k
    RMSNorm scales random too (so the text key norm counts)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FLUX)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(0.5 + torch.rand(p.shape))
    return model.eval()


def flux_transformer_from_comfy(diffusion_model, key_map: dict):
    """The diffusers FluxTransformer2DModel holding a ComfyUI Flux model's weights (same widths and depths);
    ``key_map`` is comfy.utils.flux_to_diffusers': diffusers key -> comfy key, (key, (dim, start, size)) for a
    slice of a fused tensor, or (key, None, fn) for a rewritten one."""
    from diffusers import FluxTransformer2DModel

    dm = diffusion_model
    heads = dm.num_heads
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=dm.img_in.in_features,
        num_layers=len(dm.double_blocks),
        num_single_layers=len(dm.single_blocks),
        attention_head_dim=dm.hidden_size // heads,
        num_attention_heads=heads,
        joint_attention_dim=dm.txt_in.in_features,
        pooled_projection_dim=dm.vector_in.in_layer.in_features,
        guidance_embeds=False,
        axes_dims_rope=tuple(dm.pe_embedder.axes_dim),
    )
    source = dm.state_dict()
    weights = {}
    for name in model.state_dict():
        entry = key_map[name]
        if isinstance(entry, str):
            weights[name] = source[entry]
        elif entry[1] is not None:
            dim, start, size = entry[1]
            weights[name] = source[entry[0]].narrow(dim, start, size)
        else:
            weights[name] = entry[2](source[entry[0]])
    model.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True)
    return model.eval()


def write_t5_tokenizer(folder: str, words, max_length: int = 16) -> None:
    """A T5 tokenizer (Unigram, as T5's SentencePiece model is) in which each of ``words`` is one piece and any
    other word splits into letters; T5's specials <pad> 0, </s> 1, <unk> 2 (no tokenizer can be downloaded)."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in string.ascii_lowercase]
    T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length).save_pretrained(folder)


def make_flux_base(folder: str, seed: int = 0) -> str:
    """A tiny FluxPipeline folder: a FluxTransformer2DModel of 2 heads of 16 (1 double, 1 single block), a VAE
    of 4 latent channels (16 packed), CLIP text (pooled 32) and a T5 encoder (width 32), flow-matching Euler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(seed)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(os.path.join(folder, "transformer"))
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.5)
    vae.save_pretrained(os.path.join(folder, "vae"))
    write_tokenizer(os.path.join(folder, "tokenizer"), WORDS, max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    CLIPTextModel(text_config(tokenizer, 32)).save_pretrained(os.path.join(folder, "text_encoder"))
    write_t5_tokenizer(os.path.join(folder, "tokenizer_2"), WORDS)
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(folder, "tokenizer_2"))
    t5 = T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(t5).save_pretrained(os.path.join(folder, "text_encoder_2"))
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return folder
