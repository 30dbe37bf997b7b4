"""python -m study compare --out DIR --against OTHER: each main-table method of one run against another run's,
case by case (after both evaluations; not a stage and not a claim).

Two runs read the same cases when their worlds and evaluation settings are the same: the cases, references and
seeds follow from those. Then each case's identity reading of the two runs is paired, and the exact sign test
says whether one run identifies more of them. Writes DIR/compare.json.
"""

from __future__ import annotations

import filecmp
import json
import os

from .evaluate import paired_sign
from .methods import in_table


def _cell(run_dir: str, method: str) -> dict:
    path = os.path.join(run_dir, "eval", f"main_{method}.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: finish that run's evaluation stage first.")
    with open(path) as f:
        return json.load(f)


def compare(run_dir: str, other_dir: str, key: str = "identity_top1") -> str:
    if not filecmp.cmp(os.path.join(run_dir, "world.json"), os.path.join(other_dir, "world.json"), shallow=False):
        raise SystemExit(f"{run_dir} and {other_dir} have different worlds: their cases are not the same.")
    methods = {}
    for method in in_table("main"):
        mine, theirs = _cell(run_dir, method), _cell(other_dir, method)
        if mine["settings"] != theirs["settings"] or mine["n"] != theirs["n"]:
            raise SystemExit(f"main_{method}: the two runs were evaluated with other settings; nothing to pair.")
        methods[method] = {
            "run": mine[key],
            "against": theirs[key],
            **paired_sign(mine["rows"], theirs["rows"], key),  # a_higher: cases only this run gets right
        }
    result = {"run": run_dir, "against": other_dir, "key": key, "n": mine["n"], "methods": methods}
    path = os.path.join(run_dir, "compare.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
