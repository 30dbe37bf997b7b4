"""Chroma: Flux's double and single blocks (Chroma1 keeps all 19 and 38 of FLUX.1-schnell, Apache-2.0), its text
one T5 alone, its modulations from a distilled approximator instead of per-block ones.

What the subjects touch is Flux's: the same dit block replaces, the text first in each joint attention, every text
token at position id 0, the text key RMSNorm of txt_attn (double blocks) or the one norm (single blocks).  Only
the text side differs: ComfyUI's Chroma CLIP is a T5 alone (CLIPLoader, type chroma), unpadded.  In diffusers
(ChromaPipeline) the standalone commands do not take it yet.
"""

from __future__ import annotations

from .flux import FluxFamily


class ChromaFamily(FluxFamily):
    name, title = "chroma", "Chroma"
    transformer = "ChromaTransformer2DModel"
    diffusers = False
    encoders_hint = "Load Chroma's text encoder with CLIPLoader (a t5xxl file, type chroma)."

    def matches_comfy(self, diffusion_model) -> bool:
        """comfy.ldm.chroma.model.Chroma (and what derives from it)."""
        return any(cls.__name__ == "Chroma" for cls in type(diffusion_model).__mro__)


CHROMA = ChromaFamily()
