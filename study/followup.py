"""The follow-up stage: nested attention trained with a trigger weight, to test the analysis's explanation.

The evaluation measured that the class word receives little of the attention where the product is
(results.json "trigger_share"), which scales nested's correction. If that is what holds nested back,
an encoder trained with the trigger weight raised (so the word receives more, during training and
sampling alike) should identify the product better. One run, at a weight fixed by rule before it is
trained: the bridge's chosen weight (results.json "bridge_trigger_weight"), the largest tried. Same data,
steps, batch and learning rate as the other encoders; the same cases, seeds, probe and metrics as the
main table. It is reported beside the table, not in it: the issue's methods stay as they were.
"""

from __future__ import annotations

import json
import os

from . import encoders, evaluate, metrics


def run_followup(
    run_dir: str, train_ids, heldout, resolution: int, enc_cfg: encoders.EncoderConfig, eval_cfg, log=print
) -> dict:
    """Train nested at the chosen trigger weight (once), evaluate it on the main cases; returns the record."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    weight = float(results["bridge_trigger_weight"]["chosen"])
    folder = os.path.join(run_dir, "encoders")
    out = os.path.join(folder, "adapters", "nested_trained_weight.safetensors")
    done = os.path.splitext(out)[0] + ".json"
    if not os.path.isfile(done):
        log(f"followup: training nested at trigger weight {weight:g}")
        vision, data = encoders.ensure_training_set(folder, train_ids, resolution, enc_cfg)
        base = os.path.join(run_dir, "base")
        trained = encoders.train_method("nested", base, vision, data, out, enc_cfg, trigger_weight=weight)
        with open(done + ".tmp", "w") as f:
            json.dump(trained | {"trigger_weight": weight}, f)
        os.replace(done + ".tmp", done)
    ev = evaluate.Evaluator(run_dir, heldout, eval_cfg, log)
    ev.add_adapter("nested_trained_weight", out)
    cases = evaluate.single_cases(heldout, eval_cfg.cases, eval_cfg.seed)
    cell = ev.cell(f"followup_nested_w{weight:g}", lambda: ev.single("nested_trained_weight", cases, weight=weight))
    p = metrics.cells_p(cell, results["methods"]["nested"], "identity_top1")
    with open(done) as f:
        training = json.load(f)
    record = {"trigger_weight": weight, "training": training, "main": cell, "p_vs_nested": round(p, 4)}
    results["followup"] = record
    with open(os.path.join(run_dir, "results.json") + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(run_dir, "results.json") + ".tmp", os.path.join(run_dir, "results.json"))
    return {"trigger_weight": weight, "identity_top1": cell["identity_top1"], "p_vs_nested": record["p_vs_nested"]}
