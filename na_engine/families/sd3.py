"""SD3 and SD3.5 (MMDiT): joint blocks whose one attention runs over [text; image], no RoPE.

In ComfyUI each joint block is a ``dit`` block replace ("double_block", i) and calls attention once with q, k, v
merged (B, L, H*d), after the per-head q/k norms (SD3.5's RMSNorm, SD3 Medium's none); an SD3.5 MMDiT-X block
then calls it again over the image alone, which the patch passes through.  The nested keys go through the context
stream's key norm (``context_block.attn.ln_k``) and, as the text keys, through no rotation (the positions are added
to the image tokens before the blocks).

The context is CLIP-L and CLIP-G side by side (77 tokens a chunk, padded to 4096 wide), then T5's tokens where the
CLIP object has a T5: the trigger binds at its positions in both parts.  In diffusers (StableDiffusion3Pipeline)
the standalone commands do not take SD3 yet.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..errors import NestedAttentionError
from ..hosts.comfy_dit import check_override, register_dit
from ..hosts.comfy_tokens import context_positions
from ..tokens import EOS, T5_END
from .base import Family
from .flux import transformer_config


class SD3Family(Family):
    name, title = "sd35", "SD3.5"
    diffusers = False
    transformer = "SD3Transformer2DModel"

    def matches_comfy(self, diffusion_model) -> bool:
        return hasattr(diffusion_model, "joint_blocks")

    def comfy_layers(self, diffusion_model) -> list:
        return [
            (("double_block", i, 0), block.x_block.attn.num_heads * block.x_block.attn.head_dim)
            for i, block in enumerate(diffusion_model.joint_blocks)
        ]

    def check_comfy(self, diffusion_model, has_override: bool) -> None:
        check_override(has_override, self.title)
        if getattr(diffusion_model, "register_length", 0):
            raise NestedAttentionError(
                f"This MMDiT puts {diffusion_model.register_length} register tokens before the text in its joint "
                "attention; Nested Attention supports SD3's layout, the text first (no registers)."
            )
        norms = {type(block.context_block.attn.ln_k).__name__ for block in diffusion_model.joint_blocks}
        if not norms <= {"RMSNorm", "Identity"}:
            raise NestedAttentionError(
                f"This MMDiT normalises its keys with {', '.join(sorted(norms))}; Nested Attention supports SD3's "
                "RMSNorm (SD3.5) or no key norm (SD3 Medium)."
            )

    def comfy_positions(self, clip, tokens: dict, trigger: str, text: str) -> List[int]:
        """CLIP-L's positions (CLIP-G's are the same) where the encoder has a CLIP, then T5's after them."""
        encoder = clip.cond_stage_model
        has = {name: getattr(encoder, name, None) is not None for name in ("clip_l", "clip_g", "t5xxl")}
        parts = [("l" if has["clip_l"] else "g", EOS)] if has["clip_l"] or has["clip_g"] else []
        parts += [("t5xxl", T5_END)] if has["t5xxl"] else []
        hint = "Load SD3's text encoders with TripleCLIPLoader (clip_l, clip_g, t5xxl), or the checkpoint's CLIP."
        return context_positions(clip, tokens, parts, trigger, text, hint)

    def register(self, patched, run, layers: list) -> None:
        blocks = patched.model.diffusion_model.joint_blocks
        register_dit(patched, run, layers, lambda key: _key_norm(blocks[key[1]]), 1e-6, merged=True)

    # -- diffusers: not yet (folder_family names the family and refuses it) ---------------

    def matches_folder(self, path: str, config: Optional[str] = None) -> bool:
        return transformer_config(path).get("_class_name") == self.transformer


def _key_norm(block) -> Optional[Tensor]:
    """The context stream's key RMSNorm scale (d,) (ones where it learns none), or None where it has no key norm."""
    attn = block.context_block.attn
    if type(attn.ln_k).__name__ == "Identity":
        return None
    return attn.ln_k.weight if attn.ln_k.weight is not None else torch.ones(attn.head_dim)


SD3 = SD3Family()
