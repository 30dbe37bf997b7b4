"""The study's one configuration: FULL (the committed run) and QUICK (CI's toy scale, which checks the pipeline and
the formats, not the numbers). An experiment is an override, not a module:

    python -m study run --out /tmp/lr --set base_lr=5e-4 --set base_steps=3000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Config:
    # the world
    heldout: int = 90  # products held out of all training: unseen combinations of seen values
    world_seed: int = 0
    # R0, the reader: every product of the world in every scene (with jitter), read from its true render and
    # through the autoencoder
    reader_products: int = 450
    reader_scenes: int = 8  # per product
    # the autoencoder: 32 px -> 16 x 16 x 4, trained on the train products' renders
    ae_widths: tuple = (32, 64)
    ae_steps: int = 1500
    ae_batch: int = 32
    ae_lr: float = 1e-3
    # the base: UNet and text encoder trained together on v-prediction; cross-attention at 8x8 and 4x4
    base_renders_per_product: int = 80  # training renders of each train product (random scenes)
    base_down_blocks: tuple = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    base_widths: tuple = (48, 96, 128)
    text_width: int = 128
    text_layers: int = 2
    base_steps: int = 6000
    base_batch: int = 48
    base_lr: float = 1e-3
    base_ema: float = 0.995
    described_share: float = 0.7  # captions that name the product's look; the rest say only the kind ...
    empty_share: float = 0.1  # ... or nothing (for guidance)
    localise: float = 0.05  # the class word's localisation loss (study/base.py); 0 = off
    checkpoint_every: int = 250  # base steps between resumable checkpoints
    # sampling (every rung)
    steps: int = 25
    guidance: float = 1.0
    # R1: the base draws what it is told
    r1_cases: int = 270  # held-out products x random scenes (3 each)
    r1_identity: float = 0.8
    r1_scene: float = 0.9
    # the encoders: trained by `python -m na_engine train` on photos of the train products
    photos_per_product: int = 12
    pair_share: float = 0.2  # two-product photos, as a share of the one-product ones
    vision_width: int = 64
    tokens: int = 16
    encoder_steps: int = 2500
    encoder_batch: int = 16
    encoder_lr: float = 5e-4
    # R2: nested brings back its own training products from another photo of them
    r2_cases: int = 180
    r2_identity: float = 0.8
    threads: int = 2
    seed: int = 0
    gated: bool = True  # stop at the first rung that does not hold (QUICK runs every stage: it checks the pipeline)


FULL = Config()
QUICK = replace(
    FULL,
    reader_products=30,
    reader_scenes=2,
    ae_widths=(8, 16),
    ae_steps=20,
    ae_batch=8,
    base_renders_per_product=2,
    base_widths=(16, 32, 32),
    text_width=32,
    text_layers=1,
    base_steps=12,
    base_batch=8,
    checkpoint_every=5,
    steps=4,
    r1_cases=6,
    photos_per_product=2,
    vision_width=32,
    tokens=4,
    encoder_steps=4,
    encoder_batch=2,
    r2_cases=4,
    gated=False,
)


def override(cfg: Config, pairs: list[str]) -> Config:
    """``cfg`` with each "field=value" applied, the value parsed as the field's type; a clear error otherwise."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        current = getattr(cfg, name)
        try:
            if isinstance(current, tuple):
                kind = type(current[0]) if current else str
                changes[name] = tuple(kind(v) for v in text.split(","))
            elif isinstance(current, bool):
                changes[name] = {"true": True, "false": False}[text.lower()]
            else:
                changes[name] = type(current)(text)
        except (ValueError, KeyError):
            raise ValueError(f"--set {pair!r}: {text!r} is not a {type(current).__name__}") from None
    return replace(cfg, **changes)
