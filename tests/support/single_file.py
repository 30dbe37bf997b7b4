"""Write a diffusers SD1.5-layout folder as one original Stable Diffusion (LDM / CompVis) .safetensors checkpoint.

The inverse of what ``StableDiffusionPipeline.from_single_file`` does, for the tiny test bases of
``tiny_diffusers.make_base``: the same weights under ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder).
Every key is mapped by module prefix, derived from the configs' number of levels and ``layers_per_block``;
an unmapped key is an error, so nothing is dropped silently.
"""

import glob
import json
import os

# Leaf renames inside a mapped module ({} = names unchanged).
UNET_RESNET = {
    "norm1": "in_layers.0",  # in_layers = (GroupNorm, SiLU, Conv)
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",  # emb_layers = (SiLU, Linear)
    "norm2": "out_layers.0",  # out_layers = (GroupNorm, SiLU, Dropout, Conv)
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _read(folder: str, sub: str):
    from safetensors.torch import load_file

    with open(os.path.join(folder, sub, "config.json")) as f:
        config = json.load(f)
    weights = {}
    for file in sorted(glob.glob(os.path.join(folder, sub, "*.safetensors"))):  # one file, or all shards
        weights.update(load_file(file))
    if not weights:
        raise FileNotFoundError(f"no .safetensors weights in {os.path.join(folder, sub)}")
    return config, weights


def _unet_map(cfg: dict) -> dict:
    levels, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),  # time_embed = (Linear, SiLU, Linear)
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_norm_out": ("out.0", {}),  # out = (GroupNorm, SiLU, Conv)
        "conv_out": ("out.2", {}),
        # middle_block = (ResBlock, SpatialTransformer, ResBlock)
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
    }
    for i in range(levels):
        # input_blocks.0 is conv_in; then each level takes `per` slots [ResBlock, SpatialTransformer] plus one
        # slot for its downsampler (unused after the last level), so level i, layer j is 1 + i * (per + 1) + j.
        first = 1 + i * (per + 1)
        for j in range(per):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{first + j}.0", UNET_RESNET)
            m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{first + j}.1", {})
        m[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{first + per}.0", {"conv": "op"})
        # output_blocks: both layouts run deepest level first with per + 1 layers a level, so up level i, layer j
        # is i * (per + 1) + j. The upsampler joins the level's last slot after its ResBlock [and transformer].
        first = i * (per + 1)
        for j in range(per + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{first + j}.0", UNET_RESNET)
            m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{first + j}.1", {})
        after = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
        m[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{first + per}.{after}", {})
    return m


def _vae_map(cfg: dict) -> dict:
    levels, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        m[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
    for i in range(levels):
        for j in range(per):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        m[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
        # LDM numbers decoder levels by resolution, like the encoder (up.0 is full resolution and runs last);
        # diffusers numbers them in execution order, so up_blocks.i is up.{levels - 1 - i}, with per + 1 ResBlocks.
        up = f"decoder.up.{levels - 1 - i}"
        for j in range(per + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"{up}.block.{j}", VAE_RESNET)
        m[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"{up}.upsample", {})
    return m


def _rename(weights: dict, mapping: dict, prefix: str) -> dict:
    """Swap each key's longest mapped module prefix, then the leaf module name under it."""
    out, unmapped = {}, []
    for key, value in weights.items():
        parts = key.split(".")
        heads = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))  # longest first
        module = next((head for head in heads if head in mapping), None)
        if module is None:
            unmapped.append(key)
            continue
        target, leaves = mapping[module]
        rest = key[len(module) + 1 :]
        leaf = next((old for old in leaves if rest.startswith(old + ".")), None)
        if leaf is not None:
            rest = leaves[leaf] + rest[len(leaf) :]
        out[f"{prefix}{target}.{rest}"] = value
    if unmapped:
        raise KeyError(f"no LDM name for {unmapped}")
    return out


def write_single_file(folder: str, path: str) -> str:
    """Write the unet, vae and text_encoder of diffusers ``folder`` to ``path`` in the LDM layout; returns ``path``."""
    from safetensors.torch import save_file

    unet_cfg, unet = _read(folder, "unet")
    vae_cfg, vae = _read(folder, "vae")
    _, text = _read(folder, "text_encoder")
    sd = _rename(unet, _unet_map(unet_cfg), "model.diffusion_model.")
    for key, value in _rename(vae, _vae_map(vae_cfg), "first_stage_model.").items():
        # the VAE mid attention's q/k/v/proj_out are 1x1 convs in LDM: [C, C] -> [C, C, 1, 1]
        sd[key] = value[:, :, None, None] if ".mid.attn_1." in key and value.ndim == 2 else value
    for key, value in text.items():  # transformers >= 5.6 saves CLIPTextModel without its "text_model." level
        sd["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    return path
