"""The encoders: a vision tower, a training set of photos, and each method trained by `python -m na_engine train`.

The training set is what a user with several photos per product gives `python -m na_engine prepare`: one folder
of photos per training product (random scenes, poses and lights), so each row's reference is another photo of its
product, background kept; and two-product photos, each product bound to its own class word (a <name>.json names
them), with masks. The vision tower is a seeded random CLIP vision model over the 32 px photos (patch 4): none can
be downloaded, and one trained here on products would share the reader's objective. The resampler, trained per
method, learns what to read from its features.

METHODS is the study's one table of methods: adding one touches it alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import world
from .config import Config


@dataclass(frozen=True)
class Method:
    adapter: str | None  # the trained file it samples with (None: no subject)
    tokens: int | None = None  # a trained adapter's subject tokens (None: the config's)
    mode: str = "nested"  # the trainer's --mode, and how its subjects act when sampled


METHODS = {
    "nested": Method("nested"),  # M subject tokens, nested into the class word's value
}


def make_vision(folder: str, width: int, seed: int) -> str:
    """A seeded random CLIP vision tower reading whole 32 px photos (patch 4), with its image processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    side = world.RESOLUTION
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=side,
        patch_size=4,
        projection_dim=width,
    )
    CLIPVisionModelWithProjection(config).half().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return folder


def write_photos(folder: str, masks: str, products: list, cfg: Config, seed: int) -> None:
    """<name>/<k>.png (+ .txt, the plain caption) per product, in random one-product scenes; pair<k>.png with a
    .json naming its two products by class word, and each product's mask <name>.<kind>.png under ``masks``."""
    rng = np.random.default_rng(seed)

    def save(name: str, scene: world.Scene) -> None:
        image = world.render(scene, rng)
        for root in (folder, masks):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(world.caption(scene))
        products = world.product_masks(scene, image)
        for placed, mask in zip(scene.products, products):
            suffix = "" if len(products) == 1 else f".{placed.product.kind}"
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(masks, name + suffix + ".png"))

    for product in products:
        for k in range(cfg.photos_per_product):
            save(f"{product.name}/{k:02d}", world.random_scene(rng, product))
    for k in range(int(round(len(products) * cfg.photos_per_product * cfg.pair_share))):
        first = products[int(rng.integers(len(products)))]
        others = [p for p in products if p.kind != first.kind]
        second = others[int(rng.integers(len(others)))]
        save(f"pair{k:05d}", world.random_scene(rng, first, second))
        with open(os.path.join(folder, f"pair{k:05d}.json"), "w") as f:
            json.dump({"subjects": {p.kind: p.name for p in (first, second)}}, f)


def training_set(folder: str, products: list, cfg: Config) -> tuple[str, str]:
    """vision/ and data/prepared/, made again when absent (they are not kept in git); returns their paths."""
    from na_engine.standalone.prepare import prepare

    vision = os.path.join(folder, "vision")
    if not os.path.isfile(os.path.join(vision, "preprocessor_config.json")):  # written last
        make_vision(vision, cfg.vision_width, cfg.seed)
    photos, masks, prepared = (os.path.join(folder, "data", part) for part in ("photos", "masks", "prepared"))
    if not os.path.isfile(os.path.join(prepared, "dataset.json")):  # written last: anything else is half made
        for part in (photos, masks, prepared):
            shutil.rmtree(part, ignore_errors=True)
        write_photos(photos, masks, products, cfg, cfg.seed + 1)
        prepare(photos, prepared, list(world.KINDS), resolution=world.RESOLUTION, keep_captions=True, masks=masks)
    return vision, prepared


def train_method(name: str, base: str, vision: str, data: str, out: str, cfg: Config) -> dict:
    """One method through the project's trainer (resuming its last checkpoint); its final loss and time."""
    import csv

    from na_engine.standalone.train import TrainConfig, checkpoints, train

    method = METHODS[name]
    run = TrainConfig(
        base=base,
        clip_vision=vision,
        data=data,
        out=out,
        steps=cfg.encoder_steps,
        batch_size=cfg.encoder_batch,
        lr=cfg.encoder_lr,
        warmup=100,
        ema=0.999,
        tokens=method.tokens or cfg.tokens,
        resampler_depth=2,
        checkpoint_every=max(1, cfg.encoder_steps // 5),
        resume="latest" if checkpoints(os.path.splitext(out)[0] + "_run") else None,
        seed=cfg.seed,
        mode=method.mode,
    )
    train(run)
    with open(os.path.join(run.run_dir, "loss.csv")) as f:
        rows = list(csv.DictReader(f))
    tail = [float(row["loss"]) for row in rows[-max(1, len(rows) // 10) :]]
    return {"final_loss": round(sum(tail) / len(tail), 5), "steps": cfg.encoder_steps}


def build(folder: str, base: str, products: list, cfg: Config, log=print) -> dict:
    """vision/, data/ and adapters/<method>.safetensors for every METHODS adapter, each trained once."""
    vision, prepared = training_set(folder, products, cfg)
    os.makedirs(os.path.join(folder, "adapters"), exist_ok=True)
    record: dict = {"methods": {}}
    for name in sorted({m.adapter for m in METHODS.values() if m.adapter}):
        out = os.path.join(folder, "adapters", f"{name}.safetensors")
        done = os.path.splitext(out)[0] + ".json"  # written once the adapter is
        if not os.path.isfile(done):
            log(f"encoders: training {name}")
            trained = train_method(name, base, vision, prepared, out, cfg)
            with open(done + ".tmp", "w") as f:
                json.dump(trained, f)
            os.replace(done + ".tmp", done)
        with open(done) as f:
            record["methods"][name] = json.load(f)
        log(f"encoders: {name} {record['methods'][name]}")
    return record
