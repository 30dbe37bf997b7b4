"""python -m study diagnose --out DIR: two readings beside the evaluation, each testing one explanation of
where identity is lost.  Run it after the evaluation stage; its cells are cached in DIR/diagnosis/ and its
summary written to DIR/diagnosis.json.  It is not a stage: the claims are the evaluation's alone.

token retrieval: each trained encoder's subject tokens of two references of every held-out product, each in
its own random scene with random attributes; top-1 when a reference's tokens are closest (cosine, tokens
flattened) to the other reference of the same product.  Low: the encoder does not tell products apart from
such photos, and no denoiser could; high while generation is low: the tokens hold the product and the
denoiser does not draw it.

attribute drift: from the evaluation's cached trade-off cells (no generation), each attribute's accuracy at
each strength.  The reference always shows the other value of every attribute, so an accuracy falling with
strength means the subject brings the reference's pose, light or cap along, whether or not identity comes.

seen products: the main table's kind of cases (a reference contradicting the prompt in scene and attributes),
drawn from as many *train* identities as there are held-out ones, whose photos the encoders trained on; the
probe's gallery is those identities, so chance is the same.
- seen products come back and held-out ones do not: the encoders memorise products instead of reading them
  from the reference (too few identities to generalise from);
- neither comes back: the adapter's signal is too weak, or the base does not use it, whatever the product.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from . import evaluate, world
from .methods import ATTRIBUTE_METRICS, TRAINED, in_table

FOLDER = "diagnosis"


def seen_products(run_dir: str, train, count: int, cfg: evaluate.EvalConfig, log=print) -> dict:
    """Identity top-1 (and every other main-table reading) of each main-table method on ``count`` train identities."""
    ev = evaluate.Evaluator(run_dir, train[:count], cfg, log, folder=FOLDER)
    cases = evaluate.single_cases(train[:count], count * 2, cfg.seed)
    cells = {m: ev.cell(f"seen_{m}", lambda m=m: ev.single(m, cases)) for m in in_table("main")}
    return {
        "what": f"{len(cases)} cases of {count} train identities (chance {1 / count:.4f}), read as the main table",
        "command": f"python -m study diagnose --out {run_dir}",
        "methods": {m: evaluate._summary(c) for m, c in cells.items()},
    }


def token_retrieval(ev: evaluate.Evaluator, heldout, seed: int) -> dict:
    """Per trained encoder: top-1 of reference-to-reference retrieval among the held-out products by their tokens."""
    rng = np.random.default_rng(seed)
    pairs = [[world.random_scene(rng, ident) for _ in range(2)] for ident in heldout]
    out = {}
    for name in TRAINED:
        generator = ev.generators[name]
        tokens = [
            [generator.encode([evaluate.reference_photo(s, ev.resolution)], "x").tokens.flatten() for s in pair]
            for pair in pairs
        ]
        a, b = (torch.nn.functional.normalize(torch.stack([t[i] for t in tokens]).float(), dim=-1) for i in (0, 1))
        sims = a @ b.T  # (P, P): reference 1 of product i against reference 2 of product j
        hits = (sims.argmax(1) == torch.arange(len(heldout))).float()
        out[name] = {"top1": round(float(hits.mean()), 4), "n": len(heldout)}
    return {"what": f"two references of each of {len(heldout)} held-out products, random scenes", "methods": out}


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


def diagnose(run_dir: str, train, heldout, cfg: evaluate.EvalConfig, log=print) -> str:
    retrieval = token_retrieval(evaluate.Evaluator(run_dir, heldout, cfg, log, folder=FOLDER), heldout, cfg.seed + 7)
    result = {
        "token_retrieval": retrieval,
        "attribute_drift": attribute_drift(run_dir, cfg),
        "seen_products": seen_products(run_dir, train, len(heldout), cfg, log),
    }
    path = os.path.join(run_dir, "diagnosis.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
