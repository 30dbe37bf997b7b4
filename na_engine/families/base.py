"""What a model family supplies to the hosts and the standalone commands: the one object an architecture adds.

A family answers, for its architecture, the questions every other module used to answer with an ``if flux``:
* its layers: the canonical table (``layers.TABLES``), a loaded ComfyUI model's, a diffusers folder's;
* where the trigger sits in the text the model attends over (its tokenizers, their order in the context);
* for joint attention, where the text sits in the joint sequence (first) and the rotation its keys take;
* the ComfyUI registration of its patches, and the checks that the ComfyUI at hand can take them;
* the diffusers side: loading a base folder, the denoiser call, a training step's inputs, sampling and decoding.

No module imports ComfyUI or, at import time, diffusers; a family's diffusers parts import it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from torch import Tensor

from ..errors import NestedAttentionError
from ..layers import TABLES, Layer


@dataclass
class StepInputs:
    """One training micro-batch's model inputs and regression target, as its family's denoiser takes them."""

    noisy: Tensor
    timesteps: Tensor
    context: Tensor
    added: Optional[dict]
    target: Tensor
    where: Callable  # (base, subject captions, triggers) -> (S, T) bool: each subject's trigger positions
    layout: Callable  # (B, C, h, w) latent-shaped -> the target's shape (its loss weights)


class Family:
    """The base of every family; a subclass sets the names and overrides what its architecture does."""

    name = ""  # the key of layers.TABLES and of an adapter's "base" record: "sd15", "flux", ...
    title = ""  # for messages: "SD1.5", "Flux", ...
    modes: Tuple[str, ...] = ("nested",)  # the --mode values its adapters can act in
    side_multiple = 8  # image sides must be multiples of this (the VAE's factor, times a DiT's patch)
    default_size = 512  # generate's image side where the base records none
    guidance = 7.0  # the validation images' guidance (classifier-free, or a distilled model's embedded one)
    diffusers = True  # whether train and generate take its base folders (else ComfyUI only, so far)

    @property
    def table(self) -> List[Layer]:
        """The layer table of the family's usual weights."""
        return TABLES[self.name]

    # -- ComfyUI -----------------------------------------------------------------------------

    def matches_comfy(self, diffusion_model) -> bool:
        raise NotImplementedError

    def comfy_layers(self, diffusion_model) -> list:
        """(ComfyUI key, width) of every layer the patch serves, in the table's order."""
        raise NotImplementedError

    def check_comfy(self, diffusion_model, has_override: bool) -> None:
        """Raise where this ComfyUI, or this variant of the family, cannot be patched.  ``has_override``: the
        ComfyUI honours transformer_options["optimized_attention_override"]."""

    def comfy_positions(self, clip, tokens: dict, trigger: str, text: str) -> List[int]:
        """The context positions of every occurrence of ``trigger`` in ``text``'s tokens (``clip.tokenize``'s)."""
        raise NotImplementedError

    def register(self, patched, run, layers: list) -> None:
        """Put ``run``'s patches and its model wrapper on the ModelPatcher ``patched`` at ``layers`` (comfy_layers'
        keys), stacked on any registered before."""
        raise NotImplementedError

    # -- diffusers ---------------------------------------------------------------------------

    def matches_folder(self, path: str, config: Optional[str] = None) -> bool:
        raise NotImplementedError

    def folder_layers(self, path: str, config: Optional[str] = None) -> List[Layer]:
        raise NotImplementedError

    def context_width(self, path: str, config: Optional[str], layers: List[Layer]) -> int:
        """The width of the text tokens the nested keys stand beside: a fresh adapter's token width."""
        raise NotImplementedError

    def load(self, path: str, config: Optional[str], dtype):
        """The frozen base: an object with unet (the denoiser), vae, text_encoders, scheduler and family."""
        raise NotImplementedError

    def denoise(self, unet, noisy: Tensor, timesteps: Tensor, context: Tensor, added: Optional[dict]) -> Tensor:
        raise NotImplementedError

    def grid(self, noisy: Tensor) -> tuple:
        """The latent grid the subjects' masks and maps are read at."""
        raise NotImplementedError

    def step_inputs(self, base, latents: Tensor, noise: Tensor, timesteps: Tensor, captions: List[str],
                    resolution: int, dtype) -> StepInputs:  # fmt: skip
        """A micro-batch's noised inputs and target from its scaled latents (B, C, h, w), noise and timesteps."""
        raise NotImplementedError

    def pipeline(self, base, device):
        """The diffusers pipeline generate samples with, on ``device``."""
        raise NotImplementedError

    def check_call(self, negative: str, size: int, pipe) -> None:
        """Refuse what this family cannot sample (a negative prompt without true CFG, a side off its grid)."""

    def trigger_mask(self, base, pipe, prompt: str, trigger: str, cfg: float) -> Tensor:
        """(R, T) bool over the rows of one pipeline call: the trigger's positions in the conditional row(s)."""
        raise NotImplementedError

    def rows(self, cfg: float) -> int:
        """How many halves a pipeline call's batch has (2: [negative, positive])."""
        return 1

    def sample(self, pipe, prompt: str, negative: str, steps: int, cfg: float, size: int, generator) -> Tensor:
        """The pipeline's final latents."""
        raise NotImplementedError

    def latent_grid(self, pipe, size: int) -> tuple:
        raise NotImplementedError

    def decode(self, base, latents: Tensor, size: int):
        """Latents -> a PIL image."""
        raise NotImplementedError

    def refuse_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise NestedAttentionError(
                f"--mode {mode} is not available on {self.title}: a {self.title} adapter's subjects act through "
                "nested attention."
            )
