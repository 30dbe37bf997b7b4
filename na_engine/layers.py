"""The canonical table of cross-attention layers.

A layer has one index shared by every format: its position in diffusers'
``unet.attn_processors`` order among the attn2 layers (down blocks, then up
blocks, then the mid block), which is also IP-Adapter's numbering
(``ip_adapter.{2*index+1}.to_k_ip``).  The same layer in ComfyUI is the attn2
replace key ``(block, block_id, block_index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

from .errors import NestedAttentionError

ComfyKey = Tuple[str, int, int]


@dataclass(frozen=True)
class Layer:
    index: int
    diffusers: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    comfy: ComfyKey  # e.g. ("input", 4, 0)
    width: int  # the layer's query/key/value width, heads * head_dim

    def to_json(self) -> list:
        return [self.diffusers, list(self.comfy), self.width]

    @staticmethod
    def from_json(index: int, item: Sequence) -> "Layer":
        name, key, width = item
        return Layer(index, str(name), (str(key[0]), int(key[1]), int(key[2])), int(width))


def unet_layers(base_width: int, levels: Sequence[Tuple[int, int]], n_levels: int, mid_depth: int) -> List[Layer]:
    """Layers of a diffusers-style UNet: 2 attentions per down level, 3 per up level.

    ``levels`` lists (level, transformer depth) for each level that has attention;
    its width is base_width * 2**level capped at 4x, as in SD1.5 and SDXL.
    """
    width = {lvl: base_width * min(2**lvl, 4) for lvl, _ in levels}
    down, up = [], []
    for lvl, depth in levels:
        for a in range(2):
            for t in range(depth):
                down.append(
                    (
                        f"down_blocks.{lvl}.attentions.{a}.transformer_blocks.{t}.attn2",
                        ("input", 1 + 3 * lvl + a, t),
                        width[lvl],
                    )
                )
        u = n_levels - 1 - lvl
        for a in range(3):
            for t in range(depth):
                up.append(
                    (
                        u,
                        f"up_blocks.{u}.attentions.{a}.transformer_blocks.{t}.attn2",
                        ("output", 3 * u + a, t),
                        width[lvl],
                    )
                )
    up = [item[1:] for item in sorted(up, key=lambda item: item[0])]
    top = max(lvl for lvl, _ in levels)
    mid = [
        (f"mid_block.attentions.0.transformer_blocks.{t}.attn2", ("middle", 0, t), width[top]) for t in range(mid_depth)
    ]
    return [Layer(i, name, key, w) for i, (name, key, w) in enumerate(down + up + mid)]


def diffusers_layers(config: Mapping) -> List[Layer]:
    """The layer table of any diffusers UNet2DConditionModel, from its config.

    Order is ``unet.attn_processors``' (down, up, mid).  ComfyUI numbers input blocks
    conv_in = 0, then one id per res(+attention) block and per downsampler; output
    blocks get layers_per_block + 1 ids per level, the upsampler folded in.
    """
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    n, widths = len(downs), list(config["block_out_channels"])
    per_block = _per_level(config["layers_per_block"], n)
    depth = _per_level(config.get("transformer_layers_per_block", 1), n)
    up_depth = _per_level(config.get("reverse_transformer_layers_per_block") or depth[::-1], n)
    down, up = [], []
    for lvl, kind in enumerate(downs):
        first = 1 + sum(p + 1 for p in per_block[:lvl])
        if "CrossAttn" in kind:
            down += [
                (f"down_blocks.{lvl}.attentions.{a}.transformer_blocks.{t}.attn2", ("input", first + a, t), widths[lvl])
                for a in range(per_block[lvl])
                for t in range(depth[lvl])
            ]
    for u, kind in enumerate(ups):
        first, lvl = sum(p + 1 for p in per_block[::-1][:u]), n - 1 - u
        if "CrossAttn" in kind:
            up += [
                (f"up_blocks.{u}.attentions.{a}.transformer_blocks.{t}.attn2", ("output", first + a, t), widths[lvl])
                for a in range(per_block[lvl] + 1)
                for t in range(up_depth[u])
            ]
    mid = []
    if "CrossAttn" in (config.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""):
        mid = [
            (f"mid_block.attentions.0.transformer_blocks.{t}.attn2", ("middle", 0, t), widths[-1])
            for t in range(depth[-1])
        ]
    return [Layer(i, name, key, w) for i, (name, key, w) in enumerate(down + up + mid)]


def dit_layers(double: int, single: int, width: int) -> List[Layer]:
    """Layers of a Flux-style DiT: its double-stream blocks, then its single-stream blocks, one joint attention
    each.  Names are diffusers' FluxTransformer2DModel's; keys are ComfyUI's ``patches_replace["dit"]`` keys,
    ("double_block", i) and ("single_block", i), with a third member 0 so that every key has one shape."""
    doubles = [(f"transformer_blocks.{i}.attn", ("double_block", i, 0)) for i in range(double)]
    singles = [(f"single_transformer_blocks.{i}.attn", ("single_block", i, 0)) for i in range(single)]
    return [Layer(i, name, key, width) for i, (name, key) in enumerate(doubles + singles)]


def is_joint(layers: Sequence[Layer]) -> bool:
    """Whether a table's layers are joint (DiT) attentions rather than a UNet's cross-attentions."""
    return bool(layers) and all(layer.comfy[0] in ("double_block", "single_block") for layer in layers)


def base_name(layers: Sequence[Layer]) -> str:
    """'sd15' or 'sdxl' when the table is theirs, else 'custom'."""
    for base, table in TABLES.items():
        if list(layers) == table:
            return base
    return "custom"


def _per_level(value, n: int) -> List[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


TABLES: Dict[str, List[Layer]] = {
    "sd15": unet_layers(320, [(0, 1), (1, 1), (2, 1)], n_levels=4, mid_depth=1),
    "sdxl": unet_layers(320, [(1, 2), (2, 10)], n_levels=3, mid_depth=10),
    "flux": dit_layers(19, 38, 3072),  # Flux.1 dev and schnell: 24 heads of 128
    "chroma": dit_layers(19, 38, 3072),  # Chroma1: Flux.1 schnell's blocks (an adapter's table says "flux")
    "sd35": dit_layers(38, 0, 2432),  # SD3.5 Large: 38 joint blocks of 38 heads of 64
}

BASE_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux", "chroma": "Chroma", "sd35": "SD3.5"}


def base_for_layer_count(count: int) -> str:
    for base, table in TABLES.items():
        if len(table) == count:
            return base
    raise NestedAttentionError(
        f"{count} cross-attention layers match no known base model "
        f"({', '.join(f'{BASE_NAMES[b]}: {len(t)}' for b, t in TABLES.items())})."
    )


def describe(layers: Sequence[Layer]) -> str:
    """'SD1.5 (16 layers, widths 320/640/1280)', or 'an unknown model with 12 layers of widths 32/64'.

    The family is recognised whatever the order the layers are listed in (ComfyUI's or diffusers')."""
    widths = "/".join(str(w) for w in sorted({layer.width for layer in layers}))
    mine = sorted((layer.comfy, layer.width) for layer in layers)
    for base, table in TABLES.items():
        if mine == sorted((t.comfy, t.width) for t in table):
            return f"{BASE_NAMES[base]} ({len(layers)} layers, widths {widths})"
    return f"an unknown model with {len(layers)} layers of widths {widths}"
