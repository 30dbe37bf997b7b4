"""python -m study guidance --out DIR: whether the sampler's guidance scale holds identity back.

Every round sampled every method at one classifier-free guidance scale (EvalConfig.cfg, 4), set in feasibility
from how samples looked and never measured on identity. Round 8 (study/round8.md) asks whether the sampler draws
less of a product than its conditioning carries, in two steps, so that the main table's cases take no part in the
choice:
1. selection: fresh cases of the held-out products (another seed than the main table's), each READING at each
   scale of SCALES. The chosen scale is the one with the most identity hits summed over the readings; a tie goes to
   the round's scale, then to the lower one.
2. confirmation: the main table's cases at the chosen scale, each reading beside the round's own cells (the
   evaluation's and diagnose's: the same cases and noise at the round's scale), case by case.
A reading is the base told the product's look (diagnose.described_base) or a trained main-table method.
Writes DIR/guidance/<scale>/ (cells, rows kept) and DIR/guidance.json. Not a stage and not a claim.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from . import diagnose, evaluate

FOLDER = "guidance"
SCALES = (2.0, 4.0, 7.0, 12.0)  # 4: every round's; 7: the standalone generator's default
READINGS = ("described", "single_token", "decoupled", "nested")
SELECTION_SEED = 50_000  # added to the evaluation's seed: cases the main table never drew


def read(ev: evaluate.Evaluator, cases, prefix: str, described: str, described_ev=None) -> dict:
    """Each READING's cell (rows kept) on ``cases``: <prefix><method>, and the base told the look as
    <described>_base (from ``described_ev``'s folder when given)."""
    told = diagnose.described_base(described_ev or ev, cases, described, rows=True)["reading"]
    methods = {m: ev.cell(f"{prefix}{m}", lambda m=m: ev.single(m, cases)) for m in READINGS if m != "described"}
    return {"described": told} | methods


def chosen(hits: dict, round_scale: float) -> float:
    """The scale with the most hits; a tie goes to the round's scale, then to the lower scale."""
    return max(hits, key=lambda s: (hits[s], s == round_scale, -s))


def _by_case(cells: dict) -> zip:
    """Each case's identity hits, one per READING."""
    return zip(*([row["identity_top1"] for row in cells[r]["rows"]] for r in READINGS))


def _named(scales, form: str, sep: str) -> str:
    """'' for SCALES, else ``form`` holding the scales joined by ``sep``."""
    return "" if tuple(scales) == SCALES else form.format(sep.join(f"{s:g}" for s in scales))


def _at(run_dir: str, heldout, cfg: evaluate.EvalConfig, scale: float, log) -> evaluate.Evaluator:
    return evaluate.Evaluator(run_dir, heldout, replace(cfg, cfg=scale), log, folder=os.path.join(FOLDER, f"{scale:g}"))


def guidance(run_dir: str, heldout, cfg: evaluate.EvalConfig, log=print, scales=SCALES) -> str:
    """Writes DIR/guidance.json for SCALES, else DIR/guidance_<scales>.json (``scales`` must hold the round's)."""
    if cfg.cfg not in scales:
        listed = " ".join(f"{s:g}" for s in scales)
        raise SystemExit(f"--scales {listed}: add the round's scale, {cfg.cfg:g}, for the readings to compare against.")
    selection_cases = evaluate.single_cases(heldout, cfg.cases, cfg.seed + SELECTION_SEED)
    selection = {s: _at(run_dir, heldout, cfg, s, log) for s in scales}
    cells = {s: read(ev, selection_cases, "select_", "select_described") for s, ev in selection.items()}
    # per case, the readings' identity hits summed: the readings share a case's scene, reference and noise
    rows = {s: [{"identity_top1": sum(map(int, k))} for k in _by_case(cells[s])] for s in scales}
    hits = {s: sum(row["identity_top1"] for row in rows[s]) for s in scales}
    best = chosen(hits, cfg.cfg)
    cases = evaluate.single_cases(heldout, cfg.cases, cfg.seed)
    # the round's own cells, named as the evaluation and diagnose name them on the main table's cases
    diagnosis = evaluate.Evaluator(run_dir, heldout, cfg, log, folder=diagnose.FOLDER)
    round_cells = read(evaluate.Evaluator(run_dir, heldout, cfg, log), cases, "main_", "described", diagnosis)
    now = read(selection[best], cases, "main_", "described")
    confirmation = {
        r: {
            "round": evaluate.summary_of(round_cells[r]),
            "chosen": evaluate.summary_of(now[r]),
            "identity_chosen_vs_round": evaluate.paired_sign(now[r]["rows"], round_cells[r]["rows"], "identity_top1"),
        }
        for r in READINGS
    }
    result = {
        "what": "the readings at each guidance scale on fresh cases, then the main table's cases at the chosen "
        "scale beside the round's; not a claim",
        "command": f"python -m study guidance --out {run_dir}" + _named(scales, " --scales {}", " "),
        "round_scale": cfg.cfg,
        "selection": {
            "cases": len(selection_cases),
            "seed": cfg.seed + SELECTION_SEED,
            "identity_hits": {f"{s:g}": h for s, h in hits.items()},
            "chosen_scale": best,
            "readings": {f"{s:g}": {r: evaluate.summary_of(c) for r, c in cells[s].items()} for s in scales},
            # each scale against the round's, case by case on the readings' summed hits (not part of the choice)
            "identity_vs_round_by_case": {
                f"{s:g}": evaluate.paired_sign(rows[s], rows[cfg.cfg], "identity_top1") for s in scales
            },
        },
        "confirmation": {
            "cases": len(cases),
            "scale": best,
            "readings": confirmation,
            "nested_vs_single_token_at_chosen": evaluate.paired_sign(
                now["nested"]["rows"], now["single_token"]["rows"], "identity_top1"
            ),
        },
    }
    path = os.path.join(run_dir, f"{FOLDER}{_named(scales, '_{}', '_')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
