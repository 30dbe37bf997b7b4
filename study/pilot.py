"""python -m study pilot --out DIR --change NAME: one change to nested's training, tried on its own before a
full round is planned around it.

It is not a stage and not a claim: one method (nested), the round's data and seed, trained with the change
(CHANGES), then read on the main table's first cases beside the round's own nested adapter on the very same
cases and references, and on worth's held-out products (the product error, worth.reference_rows) beside it too.
Writes DIR/pilot/ (the adapter, its loss.csv, the cells) and DIR/pilot_<NAME>.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np

from . import diagnose, encoders, evaluate, metrics, worth

FOLDER = "pilot"


@dataclass(frozen=True)
class Change:
    what: str
    budget: float = 1.0  # times the round's training steps
    white_references: bool = False  # another photo's background whitened by its mask, in training and reading
    subject_loss_weight: float = 1.0  # the trainer's --subject-loss-weight


CHANGES = {
    "white_references": Change("trained and read on masked references (round 2's pilot)", white_references=True),
    "double_budget": Change("trained for twice the round's steps, same data, seed and schedule shape", budget=2.0),
    "subject_loss": Change(
        "the loss weighs a latent inside the product's mask 5 times one outside (products cover 14.6% of a "
        "training render, so they take about half the loss instead of a seventh; study/round6.md)",
        subject_loss_weight=5.0,
    ),
}


def product_error(run_dir: str, heldout, adapter, cfg: worth.WorthConfig) -> dict:
    """Nested's worth, the round's adapter and the changed one, on the same products, draws and references
    (worth.reference_rows): each's summary as worth.json gives it, and per reference, changed minus round in
    points of the product error's change against no subject (negative: the change helps more)."""
    reader = worth.Reader(run_dir)
    rounds = worth.reference_rows(reader, heldout, cfg, "nested")
    reader.use("nested", adapter)
    changed = worth.reference_rows(reader, heldout, cfg, "nested")

    def change(rows, cond):  # (products,) percent
        return np.array([100 * (r[cond]["product"] - r["none"]["product"]) / r["none"]["product"] for r in rows])

    def identity(rows):  # (products,) points: another product's reference against this one's, both masked
        return change(rows, "nested/wrong") - change(rows, "nested/masked")

    paired = {c: change(changed, c) - change(rounds, c) for c in rounds[0] if c != "none"}
    paired["nested/identity_pct"] = identity(changed) - identity(rounds)
    differences = {
        c: {"mean": round(float(d.mean()), 2), "ci95": [round(v, 2) for v in metrics.mean_interval(d)]}
        for c, d in paired.items()
    }
    return {"products": len(rounds), "round": worth.summarise(rounds), "changed": worth.summarise(changed)} | {
        "changed_minus_round": differences
    }


def pilot(
    run_dir: str,
    heldout,
    cases: int,
    cfg: evaluate.EvalConfig,
    enc: encoders.EncoderConfig,
    name: str,
    worth_cfg: worth.WorthConfig,
    log=print,
) -> str:
    from na_engine.formats import load_adapter

    change = CHANGES[name]
    folder = os.path.join(run_dir, FOLDER)
    out = os.path.join(folder, f"nested_{name}.safetensors")
    record = os.path.join(folder, f"nested_{name}.json")
    if not os.path.isfile(record):  # written once the adapter is
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(run_dir, "encoders", "data", "prepared")
        vision, base = os.path.join(run_dir, "encoders", "vision"), os.path.join(run_dir, "base")
        if not os.path.isfile(os.path.join(data, "dataset.json")):
            raise SystemExit(f"{data} is missing: run the study's encoders stage (it re-renders the training set).")
        log(f"pilot: training nested, {change.what}")
        budget = replace(enc, steps=int(round(enc.steps * change.budget)))
        trained = encoders.train_method(
            "nested",
            base,
            vision,
            data,
            out,
            budget,
            white_references=change.white_references,
            subject_loss_weight=change.subject_loss_weight,
        )
        with open(record, "w") as f:
            json.dump(trained, f)
    with open(record) as f:
        trained = json.load(f)
    few = evaluate.single_cases(heldout, cfg.cases, cfg.seed)[:cases]
    photo = diagnose.masked_photo if change.white_references else None  # None: the evaluation's own reference
    photos = "masked" if photo else "as_evaluated"
    ev = evaluate.Evaluator(run_dir, heldout, cfg, log, FOLDER, photo)
    rounds = ev.cell(f"nested_round_{photos}", lambda: ev.single("nested", few))
    ev.use_adapter("nested", load_adapter(out))
    changed = ev.cell(f"nested_{name}_{photos}", lambda: ev.single("nested", few))
    result = {
        "what": f"the main table's first {len(few)} cases, references {photos}; one method, not a claim",
        "change": change.what,
        "command": f"python -m study pilot --out {run_dir} --change {name}",
        "training": trained,
        "nested_round": evaluate.summary_of(rounds),
        "nested_changed": evaluate.summary_of(changed),
        "identity_changed_vs_round": evaluate.paired_sign(changed["rows"], rounds["rows"], "identity_top1"),
        "token_retrieval_changed": {
            v: row["nested"] for v, row in diagnose.token_retrieval(ev, heldout, cfg.seed + 7)["top1"].items()
        },
        "product_error": product_error(run_dir, heldout, load_adapter(out), worth_cfg),
    }
    path = os.path.join(run_dir, f"pilot_{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
