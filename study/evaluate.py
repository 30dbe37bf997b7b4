"""Readings: every rung's cases, drawn, read by the world's rules, scored. The metrics are fixed here, before any
method is compared, and one place defines them (SCORES).

A case is a scene the prompt names and a seed. A reading scores each part of what the prompt asked for: the
product's identity (exact: all four parts) and each part alone, the scene and the product's attributes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import world

# score name -> what it compares (a world.Reading attribute, or "identity": all four parts at once)
SCORES = ("identity", *world.PARTS, "background", *world.SCENE[1:], *world.ATTRIBUTES)


@dataclass(frozen=True)
class Case:
    scene: world.Scene
    seed: int


def cases(products: list, count: int, seed: int) -> list[Case]:
    """``count`` one-product cases cycling through ``products``, each in a random scene with its own seed."""
    rng = np.random.default_rng(seed)
    return [Case(world.random_scene(rng, products[k % len(products)]), seed * 100_000 + k) for k in range(count)]


def score(scene: world.Scene, image: np.ndarray) -> dict:
    """{score: 0 or 1} for the scene's (first) product as read from ``image``; 0 where no product is seen."""
    background, readings = world.read(image, count=len(scene.products))
    placed, seen = scene.products[0], readings[0] if readings else None
    out = {"background": int(background == scene.background)}
    out["identity"] = int(seen is not None and seen.product() == placed.product)
    for name in world.PARTS:
        out[name] = int(seen is not None and getattr(seen, name) == getattr(placed.product, name))
    for name in (*world.SCENE[1:], *world.ATTRIBUTES):
        out[name] = int(seen is not None and getattr(seen, name) == getattr(placed, name))
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def summary(rows: list[dict]) -> dict:
    """{score: {"mean", "ci"}} over the rows, plus "n"."""
    out: dict = {"n": len(rows)}
    for name in SCORES:
        hits = sum(r[name] for r in rows)
        out[name] = {"mean": round(hits / max(1, len(rows)), 3), "ci": wilson(hits, len(rows))}
    return out


def reader_ceiling(products: list, scenes_each: int, seed: int, through=None) -> dict:
    """R0: the reader on true renders of ``products`` in random scenes (jittered), or on those renders passed
    through ``through`` ((n, R, R, 3) uint8 -> same), e.g. the autoencoder."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, p) for p in products for _ in range(scenes_each)]
    images = np.stack([world.render(s, rng) for s in scenes])
    if through is not None:
        images = through(images)
    return summary([score(s, im) for s, im in zip(scenes, images)])


def _pipeline(folder: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from na_engine.families.unet import load_base

    base = load_base(folder)
    pipe = StableDiffusionPipeline(
        base.vae, base.text_encoders[0], base.tokenizers[0], base.unet,
        DDIMScheduler.from_config(base.scheduler.config), None, None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw_base(folder: str, prompts, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """The base alone draws each prompt (a caption, or its (T, D) text states) from its seed's noise: (n, R, R, 3)
    uint8. The pipeline is the one na_engine's generator builds (DDIM from the base's scheduler), batched."""
    pipe = _pipeline(folder)
    out = []
    for start in range(0, len(prompts), 64):
        part = slice(start, start + 64)
        given = {"prompt": prompts[part]} if isinstance(prompts[0], str) else {"prompt_embeds": prompts[part]}
        images = pipe(
            **given,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=world.RESOLUTION,
            width=world.RESOLUTION,
            generator=[torch.Generator().manual_seed(s) for s in seeds[part]],
            output_type="np",
        ).images  # (b, R, R, 3) float in [0, 1]
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def described(folder: str, products: list, count: int, seed: int, steps: int, guidance: float):
    """R1: the base told each product's look (world.caption described). Returns (summary, cases, images)."""
    chosen = cases(products, count, seed)
    prompts = [world.caption(c.scene, described=True) for c in chosen]
    images = draw_base(folder, prompts, [c.seed for c in chosen], steps, guidance)
    return summary([score(c.scene, im) for c, im in zip(chosen, images)]), chosen, images


@torch.no_grad()
def class_word_alone(folder: str, products: list, count: int, seed: int, steps: int, guidance: float) -> dict:
    """R2's diagnosis: the plain prompt with only its class word's text state taken from the described caption, where
    the look words before it were folded in by the causal text encoder. Nested can only change the class word's
    value, so if the base does not draw the look from that state alone, it has nothing to draw it from."""
    pipe = _pipeline(folder)
    chosen = cases(products, count, seed)

    def states(described: bool):
        captions = [world.caption(c.scene, described=described) for c in chosen]
        ids = pipe.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return ids, pipe.text_encoder(ids)[0]  # (n, T), (n, T, D)

    (plain_ids, plain), (told_ids, told) = states(False), states(True)
    for i, c in enumerate(chosen):
        word = pipe.tokenizer.convert_tokens_to_ids(c.scene.products[0].product.kind + "</w>")
        plain[i, int((plain_ids[i] == word).nonzero()[0, 0])] = told[i, int((told_ids[i] == word).nonzero()[0, 0])]
    images = draw_base(folder, plain, [c.seed for c in chosen], steps, guidance)
    return summary([score(c.scene, im) for c, im in zip(chosen, images)])


def with_references(products: list, count: int, seed: int) -> list[tuple[Case, world.Scene]]:
    """One-product cases, each with its reference scene (world.reference: another photo that contradicts it)."""
    rng = np.random.default_rng([seed, 1])
    return [(case, world.reference(rng, case.scene.products[0])) for case in cases(products, count, seed)]


@torch.no_grad()
def personalised(run_dir: str, method: str, pairs: list, steps: int, guidance: float):
    """``method`` (encoders.METHODS) draws each case's plain prompt with its product taken from the reference photo,
    through na_engine's generator. Returns (summary, images)."""
    from PIL import Image

    from na_engine.families.unet import load_base
    from na_engine.formats import load_adapter
    from na_engine.standalone.generate import NestedGenerator
    from na_engine.standalone.models import load_vision

    from .encoders import METHODS

    m = METHODS[method]
    base = load_base(os.path.join(run_dir, "base"))
    vision = load_vision(os.path.join(run_dir, "encoders", "vision"))
    adapter = load_adapter(os.path.join(run_dir, "encoders", "adapters", f"{m.adapter}.safetensors"))
    generator = NestedGenerator(base, vision, adapter, "cpu")
    images = []
    for case, reference in pairs:
        photo = Image.fromarray(world.render(reference))
        subject = generator.encode([photo], case.scene.products[0].product.kind, mode=m.mode)
        image, _ = generator(
            world.caption(case.scene), subject, case.seed, steps, guidance, world.RESOLUTION, maps=False
        )
        images.append(np.asarray(image))
    images = np.stack(images)
    return summary([score(c.scene, im) for (c, _), im in zip(pairs, images)]), images
