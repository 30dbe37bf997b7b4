"""python -m study diagnose --out DIR: readings beside the evaluation, each testing one explanation of
where identity is lost.  Run it after the evaluation stage; its cells are cached in DIR/diagnosis/ and its
summary written to DIR/diagnosis.json.  It is not a stage: the claims are the evaluation's alone.

token retrieval: each trained encoder's subject tokens of two references of every held-out product, each in
its own random scene; top-1 when a reference's tokens are closest (cosine, tokens flattened) to the other
reference of the same product.  Low: the encoder does not tell products apart from such photos, and no
denoiser could; high while generation is low: the tokens hold the product and the denoiser does not draw it.
Read three ways (VARIANTS: as evaluated, background whitened, attributes alike), and for the CLIP tower's own
features too, so that what confounds the encoder (the background, the attributes, or the tower) shows.

attribute drift: from the evaluation's cached trade-off cells (no generation), each attribute's accuracy at
each strength.  The reference always shows the other value of every attribute, so an accuracy falling with
strength means the subject brings the reference's pose, light or cap along, whether or not identity comes.

described: the base alone drawing the main table's cases with the product's appearance words in the prompt
(world.appearance, the words a share of its training captions used; no reference, no adapter).
It is what the base's own channel for appearance can carry: an adapter that acts through the class word, as
nested does, steers that channel.  High: the base can draw a product it is told about, and the adapters do not
tell it enough; low: the words (and so the class word's value) do not pin a product down among the held-out
ones, and identity would need a base that takes more of a product's look from its text.

look-alikes: no generation; each main-table case's prompt scene rendered with a stand-in product of the same
kind that the base's appearance words describe alike (world.appearance), read by the probe as the product itself,
raw and through the base's VAE.  It is the most that words of that vocabulary can carry: a base that drew every
word it is told perfectly, and guessed the rest, would score this.

seen products: the main table's kind of cases (a reference contradicting the prompt in scene and attributes),
drawn from as many *train* identities as there are held-out ones, whose photos the encoders trained on; the
probe's gallery is those identities, so chance is the same.
- seen products come back and held-out ones do not: the encoders memorise products instead of reading them
  from the reference (too few identities to generalise from);
- neither comes back: the adapter's signal is too weak, or the base does not use it, whatever the product.

drawn products: the same, on the encoders' training products that the base drew in its own training too (round
5's mixture; none before). Against seen products (which the base never drew), it says how much the adapters lean
on a product the base already draws.

described drawn (round 6, read after its evaluation): `described` on drawn products' cases, so beside their
base row.  Whether the base draws the products it trained on most often when it is told their look: if it does
and the adapters do not, the reference path is what fails on them; if it does not either, the base itself cannot
draw a particular product however often it saw it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace

import numpy as np
import torch

from . import evaluate, world
from .methods import ATTRIBUTE_METRICS, TRAINED, in_table

FOLDER = "diagnosis"


def gallery(run_dir: str, products, cfg: evaluate.EvalConfig, log=print, **evaluator) -> tuple:
    """An evaluator whose probe gallery is ``products`` (``evaluator``: its other arguments; default: cells in
    diagnosis/), and two main-table cases a product among them."""
    ev = evaluate.Evaluator(run_dir, products, cfg, log, **{"folder": FOLDER, **evaluator})
    return ev, evaluate.single_cases(products, len(products) * 2, cfg.seed)


def seen_products(
    run_dir: str, products, count: int, cfg: evaluate.EvalConfig, log=print, name: str = "seen", what="train identities"
) -> dict:
    """Identity top-1 (and every other main-table reading) of each main-table method on ``count`` of ``products``."""
    ev, cases = gallery(run_dir, products[:count], cfg, log)
    cells = {m: ev.cell(f"{name}_{m}", lambda m=m: ev.single(m, cases)) for m in in_table("main")}
    return {
        "what": f"{len(cases)} cases of {count} {what} (chance {1 / count:.4f}), read as the main table",
        "command": f"python -m study diagnose --out {run_dir}",
        "methods": {m: evaluate.summary_of(c) for m, c in cells.items()},
    }


DRAWN = "of the encoders' products that the base drew"
NONE_DRAWN = "none: the encoders trained on {} products the base drew, fewer than {}"


def drawn_identities(run_dir: str, train) -> list:
    """The encoders' training products that the base drew too (round 5 on), kinds in turn."""
    from .base import BaseConfig
    from .encoders import drawn_by_base, training_products

    with open(os.path.join(run_dir, "stages.json")) as f:
        stages = json.load(f)
    share = stages["encoders"]["config"].get("base_share", 0.0)
    drawn = drawn_by_base(training_products(train, BaseConfig.from_record(stages["base"]["config"]), share))
    return [x for trio in zip(*([i for i in drawn if i.kind == k] for k in world.KINDS)) for x in trio]


def drawn_products(run_dir: str, train, count: int, cfg: evaluate.EvalConfig, log=print) -> dict:
    """seen_products on the encoders' training products that the base drew too."""
    drawn = drawn_identities(run_dir, train)
    if len(drawn) < count:
        return {"what": NONE_DRAWN.format(len(drawn), count)}
    return seen_products(run_dir, drawn, count, cfg, log, "drawn", DRAWN)


def described_base(ev: evaluate.Evaluator, cases, name: str = "described", what: str = "", rows=False) -> dict:
    """The main table's readings of the base drawing ``cases`` (the main table's unless ``what`` says otherwise)
    with their product described in the prompt (``rows``: the reading keeps its per-case rows)."""
    told = [replace(c, prompt=world.told(c.prompt)) for c in cases]
    prompts = [world.caption(c.prompt) for c in told]
    cell = ev.cell(f"{name}_base", lambda: ev.single("base", told), inputs="\n".join(prompts))
    return {
        "what": what or f"the base on the main table's {len(cases)} cases, told the product's look",
        "example_prompt": prompts[0],
        "reading": cell if rows else evaluate.summary_of(cell),
    }


def described_drawn(
    run_dir: str, train, count: int, cfg: evaluate.EvalConfig, log=print, rows=False, **evaluator
) -> dict:
    """described_base on drawn_products' cases: whether the base draws the products it drew most when told
    (``rows``: described_base's; ``evaluator``: gallery's)."""
    drawn = drawn_identities(run_dir, train)
    if len(drawn) < count:
        return {"what": NONE_DRAWN.format(len(drawn), count)}
    ev, cases = gallery(run_dir, drawn[:count], cfg, log, **evaluator)  # drawn_products' cases
    what = f"the base on drawn_products' {len(cases)} cases ({count} {DRAWN}), told the product's look"
    return described_base(ev, cases, "described_drawn", what, rows)


def lookalikes(ev: evaluate.Evaluator, cases, pool: int, seed: int = 3) -> dict:
    """The main table's readings of each case's prompt scene drawn with a look-alike (same kind and words, drawn
    from ``pool`` products of world seed ``seed``), raw and through the base's VAE; cases with none are left out."""
    stand_in = {}
    for ident in world.sample_identities(seed, pool):
        stand_in.setdefault((ident.kind, world.appearance(ident)), ident)
    found = []  # each case with its prompt's product swapped for the look-alike; read against the case's own
    for c in cases:
        other = stand_in.get((c.identity.kind, world.appearance(c.identity)))
        if other is not None:
            products = [replace(p, identity=other) for p in c.prompt.products]
            found.append(replace(c, prompt=world.Scene(c.prompt.background, products)))
    what = f"{len(found)} of the main table's {len(cases)} cases drawn with a look-alike from {pool} products"
    if not found:
        return {"what": what}
    return {
        "what": what,
        "example_words": world.appearance(found[0].identity),
        **{name: ev.ceiling(found, vae) for name, vae in (("render", False), ("vae", True))},
    }


VARIANTS = {  # how the two references of one product differ (scenes always differ)
    "as_evaluated": "random attributes, background kept (the evaluation's kind of reference)",
    "masked": "random attributes, background whitened by the render's mask",
    "same_attributes": "both at the product's default attributes, background kept",
}


def _pairs(heldout, variant: str, rng) -> list:
    attributes = variant != "same_attributes"
    return [[world.random_scene(rng, ident, attributes=attributes) for _ in range(2)] for ident in heldout]


def masked_photo(scene, resolution: int):
    """The evaluation's reference crop with its background whitened by the render's mask."""
    from na_engine.standalone.references import subject_box

    image, mask = world.render(scene, resolution)
    return subject_box(image, mask, white=True)


def _photo(scene, resolution: int, variant: str):
    return masked_photo(scene, resolution) if variant == "masked" else evaluate.reference_photo(scene, resolution)


def _top1(a: list, b: list) -> float:
    """Retrieval top-1: each of ``a`` is closest (cosine) to the ``b`` of the same index."""
    a, b = (torch.nn.functional.normalize(torch.stack(x).float(), dim=-1) for x in (a, b))
    return round(float(((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean()), 4)


def token_retrieval(ev: evaluate.Evaluator, heldout, seed: int) -> dict:
    """Per variant of reference pair: retrieval top-1 among the held-out products by each trained encoder's
    subject tokens (flattened), and by the CLIP tower's own penultimate states (flattened) they are made from."""
    from na_engine.standalone.models import image_features

    vision = next(iter(ev.generators.values())).vision
    out = {}
    for k, variant in enumerate(VARIANTS):
        pairs = _pairs(heldout, variant, np.random.default_rng(seed + k))
        photos = [[_photo(s, ev.resolution, variant) for s in pair] for pair in pairs]
        row = {
            "tower_features": _top1(
                *([image_features(vision, [p[i]], "cpu").flatten() for p in photos] for i in (0, 1))
            )
        }
        for name in TRAINED:
            encode = ev.generators[name].encode
            row[name] = _top1(*([encode([p[i]], "x").tokens.flatten() for p in photos] for i in (0, 1)))
        out[variant] = row
    return {
        "what": f"two references of each of {len(heldout)} held-out products, in two random scenes",
        "variants": VARIANTS,
        "top1": out,
    }


def attribute_drift(run_dir: str, cfg: evaluate.EvalConfig) -> dict:
    """Per trade-off method and strength: identity top-1 and each attribute's accuracy on the trade-off cases."""

    def rows(name: str) -> list:
        with open(os.path.join(run_dir, "eval", name + ".json")) as f:
            return json.load(f)["rows"][: cfg.tradeoff_cases]

    keys = ["identity_top1", *(m.key for m in ATTRIBUTE_METRICS), "size_acc"]
    out = {}
    for method in in_table("tradeoff"):
        points = []
        for strength in cfg.strengths:
            cell = (
                "main_base"
                if strength == 0
                else f"main_{method}"
                if strength == 1
                else f"tradeoff_{method}_{strength:g}"
            )
            part = rows(cell)
            points.append({"strength": strength, **{k: round(float(np.mean([r[k] for r in part])), 3) for k in keys}})
        out[method] = points
    return {"what": f"the first {cfg.tradeoff_cases} main-table cases at each strength (eval/ cells)", "methods": out}


READINGS = (
    "token_retrieval",
    "attribute_drift",
    "seen_products",
    "drawn_products",
    "described",
    "described_drawn",
    "lookalikes",
)


def diagnose(run_dir: str, train, heldout, cfg: evaluate.EvalConfig, log=print, readings=READINGS) -> str:
    """Takes ``readings`` and writes them into DIR/diagnosis.json, beside the readings it already holds."""
    ev = functools.cache(lambda: evaluate.Evaluator(run_dir, heldout, cfg, log, folder=FOLDER))  # loaded if needed
    cases = evaluate.single_cases(heldout, cfg.cases, cfg.seed)
    take = {
        "token_retrieval": lambda: token_retrieval(ev(), heldout, cfg.seed + 7),
        "attribute_drift": lambda: attribute_drift(run_dir, cfg),
        "seen_products": lambda: seen_products(run_dir, train, len(heldout), cfg, log),
        "drawn_products": lambda: drawn_products(run_dir, train, len(heldout), cfg, log),
        "described": lambda: described_base(ev(), cases),
        "described_drawn": lambda: described_drawn(run_dir, train, len(heldout), cfg, log),
        "lookalikes": lambda: lookalikes(ev(), cases, pool=200 * len(heldout)),  # full scale: all 60 have one
    }
    path = os.path.join(run_dir, "diagnosis.json")
    result = json.load(open(path)) if os.path.isfile(path) else {}
    for name in readings:
        result[name] = take[name]()
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
