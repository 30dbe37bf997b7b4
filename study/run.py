"""python -m study run --out DIR [--quick]: the whole study, stage by stage, each cached and resumable.
python -m study demo --out DIR: personalised images of held-out products from the committed weights.

    world -> base -> encoders -> probe -> evaluation -> report

A stage that has finished is recorded in DIR/stages.json with what it measured, and is skipped
when the run is started again; an interrupted stage starts over. Commit DIR after each stage
to keep it (the full run's DIR is study/weights; its training sets are re-rendered, not kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from na_engine.errors import command_line

from . import world


@dataclass(frozen=True)
class Scale:
    """Everything the two scales differ in."""

    identities: int
    heldout: int
    quick: bool


ANALYSIS = os.path.join(os.path.dirname(__file__), "analysis.md")  # by hand, on the committed full run, if any
ROUND1_SHARE = os.path.join(os.path.dirname(__file__), "round1_trigger_share.json")  # the base before the loss
FULL = Scale(identities=300, heldout=60, quick=False)
QUICK = Scale(identities=30, heldout=6, quick=True)
WORLD_SEED = 0


class Run:
    def __init__(self, out: str, scale: Scale, docs: str | None = None, readme: str | None = None):
        self.out, self.scale, self.docs, self.readme = out, scale, docs, readme
        os.makedirs(out, exist_ok=True)
        self.record_path = os.path.join(out, "stages.json")
        self.stages = json.load(open(self.record_path)) if os.path.isfile(self.record_path) else {}
        if self.stages.get("scale", {}).get("quick", scale.quick) != scale.quick:
            raise SystemExit(f"{out} holds a {'quick' if scale.quick else 'full'} run's stages; use another --out.")
        self.stages["scale"] = scale.__dict__

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def log(self, message: str) -> None:
        print(f"[study] {message}", flush=True)

    def stage(self, name: str, fn) -> dict:
        if name in self.stages:
            self.log(f"{name}: done before, kept ({self.record_path})")
            return self.stages[name]
        self.log(f"{name}: running")
        t0 = time.time()
        record = fn(self)
        record["stage_seconds"] = round(time.time() - t0 + record.get("seconds_before_resume", 0.0), 1)
        self.stages[name] = record
        with open(self.record_path + ".tmp", "w") as f:
            json.dump(self.stages, f, indent=1)
        os.replace(self.record_path + ".tmp", self.record_path)
        self.log(f"{name}: done in {record['stage_seconds']:.0f} s")
        return record

    def identities(self):
        ids = world.sample_identities(WORLD_SEED, self.scale.identities)
        return world.split(ids, self.scale.heldout)


def stage_world(run: Run) -> dict:
    train, heldout = run.identities()
    with open(run.path("world.json"), "w") as f:
        json.dump(
            {
                "seed": WORLD_SEED,
                "train": [i.to_json() for i in train],
                "heldout": [i.to_json() for i in heldout],
            },
            f,
            indent=1,
        )
    return {"train_identities": len(train), "heldout_identities": len(heldout)}


def stage_base(run: Run) -> dict:
    from . import base

    cfg = base.QUICK if run.scale.quick else base.BaseConfig()
    return base.build_base(run.path("base"), *run.identities(), cfg, run.log)


def stage_encoders(run: Run) -> dict:
    from . import encoders
    from .base import BaseConfig

    cfg = encoders.QUICK if run.scale.quick else encoders.EncoderConfig()
    base_cfg = BaseConfig.from_record(run.stages["base"]["config"])
    products = encoders.training_products(run.identities()[0], base_cfg, cfg.base_share)
    return encoders.build_encoders(run.path("encoders"), run.path("base"), products, base_cfg.resolution, cfg, run.log)


def stage_probe(run: Run) -> dict:
    from diffusers import AutoencoderKL

    from . import probe

    cfg = probe.QUICK if run.scale.quick else probe.ProbeConfig()
    train, heldout = run.identities()
    resolution = run.stages["base"]["config"]["resolution"]
    vae = AutoencoderKL.from_pretrained(run.path("base", "vae")).eval()
    model = probe.train_probe(train, resolution, cfg, run.log, vae)
    probe.save_probe(model, run.path("probe"), cfg)
    gallery = probe.Gallery(model, heldout, resolution, cfg.gallery_renders, cfg.seed)
    ceiling = probe.render_accuracy(gallery, heldout, resolution, 4, cfg.seed)
    through = probe.render_accuracy(gallery, heldout, resolution, 4, cfg.seed, vae)
    chance = 1 / len(heldout)
    run.log(f"probe: top-1 {ceiling:.3f} on fresh held-out renders, {through:.3f} through the VAE, chance {chance:.3f}")
    return {"heldout_render_top1": ceiling, "heldout_vae_top1": through, "config": cfg.__dict__}


def stage_evaluation(run: Run) -> dict:
    from . import evaluate

    cfg = evaluate.QUICK if run.scale.quick else evaluate.EvalConfig()
    results, reused = evaluate.evaluate(run.out, run.identities()[1], cfg, run.log)
    results["probe_render_top1"] = run.stages["probe"]["heldout_render_top1"]
    results["base"] = {"trigger_share": run.stages["base"]["trigger_share"]}
    if os.path.isfile(ROUND1_SHARE) and not run.scale.quick:
        with open(ROUND1_SHARE) as f:
            results["base"]["trigger_share_round1"] = json.load(f)
    with open(run.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return {"results": "results.json", "seconds_before_resume": reused}  # a resumed stage counts its cached cells


def stage_report(run: Run) -> dict:
    from . import report

    docs = run.docs or run.out
    figures = os.path.join(docs, "study") if run.docs else run.path("report")
    analysis = ""
    if not run.scale.quick and os.path.isfile(ANALYSIS):  # written by hand for the full run's numbers
        with open(ANALYSIS) as f:
            analysis = f.read()
    with open(run.path("results.json")) as f:
        results = json.load(f)
    stages = {k: v for k, v in run.stages.items() if isinstance(v, dict) and "stage_seconds" in v}
    results["run_seconds"] = round(sum(v["stage_seconds"] for v in stages.values()), 1)  # every stage before this
    with open(run.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = os.path.join(docs, "STUDY.md")
    record = report.write_report(run.out, run.identities()[1], figures, md, run.stages, analysis, run.readme)
    if run.docs:
        shutil.copyfile(run.path("results.json"), os.path.join(figures, "results.json"))
    return record


def _after_evaluation(run: Run, label: str, take) -> int:
    """A reading beside a finished evaluation: ``take(train, heldout, cfg)`` returns the file it wrote."""
    from . import evaluate

    if "evaluation" not in run.stages:
        raise SystemExit(f"{run.out} has no finished evaluation stage; run the study first.")
    cfg = evaluate.QUICK if run.scale.quick else evaluate.EvalConfig()
    train, heldout = run.identities()
    run.log(f"{label}: wrote {take(train, heldout, cfg)}")
    return 0


def _diagnose(run: Run, readings) -> int:
    from . import diagnose

    def take(train, heldout, cfg):
        return diagnose.diagnose(run.out, train, heldout, cfg, run.log, readings)

    return _after_evaluation(run, "diagnose", take)


def _pilot(run: Run, cases: int, change: str) -> int:
    from . import encoders, pilot, worth

    enc, reading = (encoders.QUICK, worth.QUICK) if run.scale.quick else (encoders.EncoderConfig(), worth.WorthConfig())

    def take(_, heldout, cfg):
        return pilot.pilot(run.out, heldout, cases, cfg, enc, change, reading, run.log)

    return _after_evaluation(run, "pilot", take)


def _base_pilot(run: Run, change: str) -> int:
    from . import base_pilot

    def take(train, heldout, cfg):
        return base_pilot.base_pilot(run.out, train, heldout, cfg, change, run.log)

    return _after_evaluation(run, "base pilot", take)


def _guidance(run: Run, scales: tuple) -> int:
    from . import guidance

    def take(_, heldout, cfg):
        return guidance.guidance(run.out, heldout, cfg, run.log, scales)

    return _after_evaluation(run, "guidance", take)


CACHES = {  # what --again deletes
    "base": ["base"],
    "encoders": ["encoders/adapters", "encoders/data"],
    "probe": ["probe"],
    "evaluation": ["eval"],
}
STAGES = [
    ("world", stage_world),
    ("base", stage_base),
    ("encoders", stage_encoders),
    ("probe", stage_probe),
    ("evaluation", stage_evaluation),
    ("report", stage_report),
]


def _compare(run: Run, against: str) -> int:
    from .compare import compare

    for folder in (run.out, against):
        path = os.path.join(folder, "stages.json")
        if not os.path.isfile(path) or "evaluation" not in json.load(open(path)):
            raise SystemExit(f"{folder} has no finished evaluation stage; run the study first.")
    run.log(f"compare: wrote {compare(run.out, against)}")
    return 0


def _worth(run: Run) -> int:
    from . import worth

    if "encoders" not in run.stages:
        raise SystemExit(f"{run.out} has no finished encoders stage; run the study first.")
    cfg = worth.QUICK if run.scale.quick else worth.WorthConfig()
    train, heldout = run.identities()
    run.log(f"worth: wrote {worth.worth(run.out, train, heldout, cfg, run.log)}")
    return 0


@command_line
def main(argv=None) -> int:
    from .base_pilot import CHANGES as BASE_CHANGES
    from .diagnose import READINGS
    from .guidance import SCALES
    from .pilot import CHANGES

    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or continue) the study")
    r.add_argument("--out", required=True, help="folder of the run's stages")
    r.add_argument("--quick", action="store_true", help="toy scale: checks the pipeline and formats, not the numbers")
    r.add_argument("--until", choices=[name for name, _ in STAGES], help="stop after this stage")
    r.add_argument("--docs", help="write STUDY.md here and its figures and results.json under DOCS/study")
    r.add_argument("--readme", help="fill this README's <!-- study:start --> ... <!-- study:end --> block")
    r.add_argument(
        "--again",
        nargs="*",
        default=[],
        choices=[name for name, _ in STAGES],
        help="run these finished stages again, and every later one (e.g. report)",
    )
    g = sub.add_parser("diagnose", help="after the evaluation: readings of where identity is lost (study/diagnose.py)")
    g.add_argument("--out", required=True, help="the run's folder")
    g.add_argument("--quick", action="store_true", help="a --quick run's folder")
    g.add_argument("--readings", nargs="+", choices=READINGS, default=READINGS, help="take only these (default: all)")
    pl = sub.add_parser("pilot", help="after the evaluation: one change to nested's training (study/pilot.py)")
    pl.add_argument("--out", required=True, help="the run's folder")
    pl.add_argument("--quick", action="store_true", help="a --quick run's folder")
    pl.add_argument("--cases", type=int, default=150, help="main-table cases read (default: all 150)")
    pl.add_argument("--change", required=True, choices=sorted(CHANGES), help="the change tried (study/pilot.py)")
    bp = sub.add_parser("base-pilot", help="after the evaluation: one change to the base (study/base_pilot.py)")
    bp.add_argument("--out", required=True, help="the run's folder")
    bp.add_argument("--quick", action="store_true", help="a --quick run's folder")
    bp.add_argument("--change", required=True, choices=sorted(BASE_CHANGES), help="the change (study/base_pilot.py)")
    gs = sub.add_parser("guidance", help="after the evaluation: the sampler's guidance scale (study/guidance.py)")
    gs.add_argument("--out", required=True, help="the run's folder")
    gs.add_argument("--quick", action="store_true", help="a --quick run's folder")
    gs.add_argument(
        "--scales", nargs="+", type=float, help="the scales read, the round's among them (default: round 8's 2 4 7 12)"
    )
    w = sub.add_parser("worth", help="after the encoders: what the subject is worth to the denoiser (study/worth.py)")
    w.add_argument("--out", required=True, help="the run's folder")
    w.add_argument("--quick", action="store_true", help="a --quick run's folder")
    c = sub.add_parser("compare", help="after two evaluations: one run's main cells against another's, case by case")
    c.add_argument("--out", required=True, help="the run's folder")
    c.add_argument("--against", required=True, help="the other run's folder (the same world and settings)")
    c.add_argument("--quick", action="store_true", help="--quick runs' folders")
    d = sub.add_parser("demo", help="personalised images of held-out products from trained weights")
    d.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "weights"), help="a run's folder")
    d.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if args.command == "demo":
        from .demo import demo

        print(f"[study demo] {demo(args.weights, args.out)}")
        return 0
    if args.command == "diagnose":
        return _diagnose(Run(args.out, QUICK if args.quick else FULL), args.readings)
    if args.command == "pilot":
        return _pilot(Run(args.out, QUICK if args.quick else FULL), args.cases, args.change)
    if args.command == "base-pilot":
        return _base_pilot(Run(args.out, QUICK if args.quick else FULL), args.change)
    if args.command == "guidance":
        return _guidance(Run(args.out, QUICK if args.quick else FULL), tuple(args.scales or SCALES))
    if args.command == "compare":
        return _compare(Run(args.out, QUICK if args.quick else FULL), args.against)
    if args.command == "worth":
        return _worth(Run(args.out, QUICK if args.quick else FULL))
    run = Run(args.out, QUICK if args.quick else FULL, args.docs, args.readme)
    names = [name for name, _ in STAGES]
    for name in args.again:  # a stage run again makes every later stage and its caches stale
        for later in names[names.index(name) :]:
            run.stages.pop(later, None)
            for cache in CACHES.get(later, ()):
                shutil.rmtree(run.path(cache), ignore_errors=True)
    for name, fn in STAGES:
        run.stage(name, fn)
        if name == args.until:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
