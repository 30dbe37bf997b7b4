"""The ComfyUI half of the layer table: the attn2 layers of a ComfyUI UNetModel, checked against an adapter's."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..errors import NestedAttentionError
from ..layers import ComfyKey, Layer, describe


def comfy_unet_layers(diffusion_model: torch.nn.Module) -> List[Tuple[ComfyKey, int]]:
    """(attn2 replace key, width) for every cross-attention layer of a ComfyUI UNetModel.

    Walks input_blocks, middle_block and output_blocks the way ComfyUI names them
    when it looks up attn2 replaces; the middle block's key is ("middle", 0, i).
    """
    found = []
    groups = [
        ("input", getattr(diffusion_model, "input_blocks", [])),
        ("middle", [getattr(diffusion_model, "middle_block", [])]),
        ("output", getattr(diffusion_model, "output_blocks", [])),
    ]
    for block, modules in groups:
        for block_id, module in enumerate(modules):
            for sub in module.modules():
                for t, tb in enumerate(getattr(sub, "transformer_blocks", [])):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is not None:
                        found.append(((block, block_id, t), attn2.to_q.weight.shape[0]))
    return found


def match_layers(
    adapter_layers: Sequence[Layer], model_layers: Sequence[Tuple[ComfyKey, int]], adapter_name: str = "the adapter"
) -> None:
    """Raise, naming both sides, unless every model layer has an adapter layer of its width."""
    have = {key: width for key, width in model_layers}
    want = {layer.comfy: layer.width for layer in adapter_layers}
    if have == want:
        return
    model_desc = describe([Layer(i, "", key, w) for i, (key, w) in enumerate(model_layers)])
    raise NestedAttentionError(
        f"{adapter_name} is made for {describe(adapter_layers)}, but this model is {model_desc}. "
        "Load an adapter made for this base model "
        "(SD1.5 adapters with SD1.5 checkpoints, SDXL with SDXL, Flux with Flux)."
    )
