"""The encoders stage: a CLIP vision tower, a training set of products, and the trained methods.

Every method of study.methods.TRAINED is trained by the project's own trainer (na_engine.standalone.train,
`python -m na_engine train`) with the same data, steps, batch, schedule and learning rate; only what the
issue compares differs (the number of tokens, nested or decoupled). The bridge is the decoupled file read
through the nested path: it needs no training.

The training set is what a user with several photos per product gives `python -m na_engine prepare`: one
subfolder of photos per product (random scenes and attributes), so each row's reference is another photo of
its product, background kept; and a quarter of the rows are two-product scenes, each product bound to its own
class word (a <name>.json names them). Its products are as many as the train identities: half of them
(base_share, round 5) are products the base drew in its own training, the rest train identities it never saw.

The CLIP vision tower stays randomly initialised (seeded): a pretrained one cannot be downloaded, and a
tower trained here on identities would share the probe's objective. The resampler, trained per method,
learns what to read from its features.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np

from . import world
from .methods import TRAINED


@dataclass
class EncoderConfig:
    scenes_per_identity: int = 12  # renders of each training product, each in a random scene
    base_share: float = 0.5  # of the training products: ones the base drew (its own); the rest, train identities
    pair_share: float = 0.25  # of the training rows: two-product scenes
    steps: int = 2500
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 100
    timestep_bias: str = "later"  # identity is decided at the noisy end (issue 17's measurement)
    timestep_bias_multiplier: float = 3.0
    timestep_bias_portion: float = 0.4
    ema: float = 0.999
    tokens: int = 16
    resampler_depth: int = 2
    vision_width: int = 64
    seed: int = 0


QUICK = EncoderConfig(scenes_per_identity=2, steps=4, batch_size=2, tokens=4, resampler_depth=1, vision_width=32)


def make_vision(folder: str, resolution: int, width: int, seed: int) -> str:
    """A seeded random CLIP vision tower reading whole renders (patch 8), with its image processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=resolution,
            patch_size=8,
            projection_dim=width,
        )
    )
    model.half().save_pretrained(folder)
    size = {"shortest_edge": resolution}
    CLIPImageProcessor(size=size, crop_size={"height": resolution, "width": resolution}).save_pretrained(folder)
    return folder


BASE_DRAWN = "base"  # the subject names of training products the base drew: base<index>


def drawn_by_base(products: dict) -> list:
    """The identities of training_products that the base drew in its own training (round 5 on; none before)."""
    return [i for name, i in products.items() if name.startswith(BASE_DRAWN)]


def training_products(train_ids, base_cfg, share: float) -> dict:
    """{subject name: identity}: as many products as train identities, kinds balanced. ``share`` of them are the
    base's own products that its training renders show most often ("base<index>"), the rest the first train
    identities ("id<index>"). A base trained on the train identities drew them all (round 3)."""
    from .base import own_products, renders_per_product

    if not base_cfg.products:
        return {f"id{i.index:04d}": i for i in train_ids}
    drawn, own = renders_per_product(base_cfg, train_ids), own_products(base_cfg, train_ids)
    per_kind = int(round(len(train_ids) * share)) // len(world.KINDS)
    chosen = {}
    for kind in world.KINDS:
        theirs = [own[i] for i in sorted(drawn, key=lambda i: (-drawn[i], i)) if own[i].kind == kind][:per_kind]
        if len(theirs) < per_kind:
            raise ValueError(f"the base drew {len(theirs)} {kind}s of its own; base_share {share} needs {per_kind}")
        chosen.update({f"{BASE_DRAWN}{i.index:04d}": i for i in theirs})
    new = len(train_ids) - len(chosen)
    chosen.update({f"id{i.index:04d}": i for i in train_ids[:new]})
    return chosen


def write_photos(folder: str, masks: str, subjects: dict, cfg: EncoderConfig, resolution: int, seed: int) -> str:
    """Renders of each subject ({name: identity}) in random one-product scenes, a subfolder each (<name>/<k>.png,
    .txt; masks in ``masks`` alike), and two-product scenes pair<k>.png, .txt, .json with masks pair<k>.<word>.png."""
    rng = np.random.default_rng(seed)
    names, identities = list(subjects), list(subjects.values())

    def save(name: str, scene) -> None:
        image, _ = world.render(scene, resolution)
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        image.save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(world.caption(scene))
        products = world.product_masks(scene, resolution)
        for p, mask in zip(scene.products, products):
            suffix = "" if len(products) == 1 else f".{p.identity.kind}"
            os.makedirs(os.path.dirname(os.path.join(masks, name)), exist_ok=True)
            mask.save(os.path.join(masks, name + suffix + ".png"))

    for subject, ident in subjects.items():
        for k in range(cfg.scenes_per_identity):
            save(f"{subject}/{k:02d}", world.random_scene(rng, ident))
    singles = len(identities) * cfg.scenes_per_identity
    for k in range(int(round(singles * cfg.pair_share / (1 - cfg.pair_share)))):
        first = int(rng.integers(len(identities)))
        others = [j for j, i in enumerate(identities) if i.kind != identities[first].kind]
        second = others[int(rng.integers(len(others)))]
        scene = world.random_scene(rng, identities[first], identities[second])
        save(f"pair{k:05d}", scene)
        with open(os.path.join(folder, f"pair{k:05d}.json"), "w") as f:
            json.dump({"subjects": {identities[j].kind: names[j] for j in (first, second)}}, f)
    return folder


def train_method(
    name: str,
    base: str,
    vision: str,
    data: str,
    out: str,
    cfg: EncoderConfig,
    trigger_weight: float = 1.0,
    white_references: bool = False,
    subject_loss_weight: float = 1.0,
) -> dict:
    """One method through the project's trainer; returns its final loss and time."""
    import csv

    from na_engine.standalone.train import TrainConfig, checkpoints, train

    method = TRAINED[name]
    tokens, mode = method.tokens, method.mode
    run = TrainConfig(
        base=base,
        clip_vision=vision,
        data=data,
        out=out,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=cfg.warmup,
        timestep_bias=cfg.timestep_bias,
        timestep_bias_multiplier=cfg.timestep_bias_multiplier,
        timestep_bias_portion=cfg.timestep_bias_portion,
        ema=cfg.ema,
        tokens=tokens or cfg.tokens,
        resampler_depth=cfg.resampler_depth,
        checkpoint_every=max(1, cfg.steps // 5),
        resume="latest" if checkpoints(os.path.splitext(out)[0] + "_run") else None,
        seed=cfg.seed,
        mode=mode,
        trigger_weight=trigger_weight,
        white_references=white_references,
        subject_loss_weight=subject_loss_weight,
    )
    train(run)
    with open(os.path.join(run.run_dir, "loss.csv")) as f:
        rows = list(csv.DictReader(f))
    tail = [float(row["loss"]) for row in rows[-max(1, len(rows) // 10) :]]
    return {
        "tokens": run.tokens,
        "mode": mode,
        "final_loss": round(sum(tail) / len(tail), 5),
        "steps": cfg.steps,
        "seconds": training_seconds(rows),
    }


def training_seconds(rows: list[dict]) -> float:
    """Training time from loss.csv rows, whose clock restarts at each resume: the sum of each run's last."""
    total, last = 0.0, 0.0
    for row in rows:
        seconds = float(row["seconds"])
        if seconds < last:  # a resume
            total += last
        last = seconds
    return round(total + last, 1)


def ensure_training_set(folder: str, subjects: dict, resolution: int, cfg: EncoderConfig) -> tuple[str, str]:
    """vision/ and data/prepared/ (re-rendered when absent: not kept in git); returns their paths."""
    from na_engine.standalone.prepare import prepare

    vision = os.path.join(folder, "vision")
    if not os.path.isfile(os.path.join(vision, "preprocessor_config.json")):  # written last
        make_vision(vision, resolution, cfg.vision_width, cfg.seed)
    photos = os.path.join(folder, "data", "photos")
    prepared = os.path.join(folder, "data", "prepared")
    masks = os.path.join(folder, "data", "masks")
    if not os.path.isfile(os.path.join(prepared, "dataset.json")):  # written last: anything else is half made
        for part in (photos, masks, prepared):
            shutil.rmtree(part, ignore_errors=True)
        write_photos(photos, masks, subjects, cfg, resolution, cfg.seed + 1)
        prepare(photos, prepared, list(world.KINDS), resolution=resolution, keep_captions=True, masks=masks)
    return vision, prepared


def build_encoders(folder: str, base: str, subjects: dict, resolution: int, cfg: EncoderConfig, log=print) -> dict:
    """vision/, data/, and adapters/<method>.safetensors, trained on ``subjects`` (training_products)."""
    vision, prepared = ensure_training_set(folder, subjects, resolution, cfg)
    os.makedirs(os.path.join(folder, "adapters"), exist_ok=True)
    drawn = len(drawn_by_base(subjects))
    products = {"drawn_by_base": drawn, "train_identities": len(subjects) - drawn}
    record = {"config": asdict(cfg), "products": products, "methods": {}, "seconds_before_resume": 0.0}
    for name in TRAINED:
        out = os.path.join(folder, "adapters", f"{name}.safetensors")
        done = os.path.splitext(out)[0] + ".json"  # written once the adapter is: a method is trained once
        if os.path.isfile(done):  # by an earlier invocation, whose time the stage's clock did not see
            with open(done) as f:
                trained = json.load(f)
            record["seconds_before_resume"] += trained["seconds"]
        else:
            log(f"encoders: training {name}")
            trained = train_method(name, base, vision, prepared, out, cfg)
            with open(done + ".tmp", "w") as f:
                json.dump(trained, f)
            os.replace(done + ".tmp", done)
        record["methods"][name] = trained
        log(f"encoders: {name} {trained}")
    return record
