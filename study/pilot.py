"""python -m study pilot --out DIR: one encoder trained on masked references, to test the diagnosis's
explanation (the reference's background hides the product from the encoders) before a full third round.

It is not a stage and not a claim: one method (nested), the round's data, seed and budget, with
`--white-references` (another photo's background whitened by its mask).  Read on the main table's first
cases with references masked the same way, beside the round's nested adapter given the same masked
references (masking at inference alone) and as evaluated (results.json).  Writes DIR/pilot/ (the adapter,
its loss.csv, the cells) and DIR/pilot.json.
"""

from __future__ import annotations

import json
import os

from . import diagnose, encoders, evaluate

FOLDER = "pilot"


def pilot(run_dir: str, heldout, cases: int, cfg: evaluate.EvalConfig, enc: encoders.EncoderConfig, log=print) -> str:
    from na_engine.formats import load_adapter

    folder = os.path.join(run_dir, FOLDER)
    out = os.path.join(folder, "nested_white.safetensors")
    record = os.path.join(folder, "nested_white.json")
    if not os.path.isfile(record):  # written once the adapter is
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(run_dir, "encoders", "data", "prepared")
        vision, base = os.path.join(run_dir, "encoders", "vision"), os.path.join(run_dir, "base")
        if not os.path.isfile(os.path.join(data, "dataset.json")):
            raise SystemExit(f"{data} is missing: run the study's encoders stage (it re-renders the training set).")
        log("pilot: training nested on masked references")
        trained = encoders.train_method("nested", base, vision, data, out, enc, white_references=True)
        with open(record, "w") as f:
            json.dump(trained, f)
    with open(record) as f:
        trained = json.load(f)
    few = evaluate.single_cases(heldout, cfg.cases, cfg.seed)[:cases]
    ev = evaluate.Evaluator(run_dir, heldout, cfg, log, folder=FOLDER, photo=diagnose.masked_photo)
    round2 = ev.cell("nested_round2_masked", lambda: ev.single("nested", few))
    ev.use_adapter("nested", load_adapter(out))
    white = ev.cell("nested_white_masked", lambda: ev.single("nested", few))
    retrieval = diagnose.token_retrieval(ev, heldout, cfg.seed + 7)["top1"]
    result = {
        "what": f"the main table's first {len(few)} cases, references masked; one method, not a claim",
        "command": f"python -m study pilot --out {run_dir}",
        "training": trained,
        "nested_round2_masked": evaluate.summary_of(round2),
        "nested_white_masked": evaluate.summary_of(white),
        "token_retrieval_nested_white": {variant: row["nested"] for variant, row in retrieval.items()},
    }
    path = os.path.join(run_dir, "pilot.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
