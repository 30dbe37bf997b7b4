"""python -m study run --out DIR [--quick] [--set FIELD=VALUE ...]: the study's ladder, stage by stage.
python -m study demo --out DIR: held-out products put into new scenes from the committed weights (grid.png).

    world -> reader (R0) -> autoencoder (R0 through it) -> base -> described (R1) -> report

Each rung is measured and recorded before the next is attempted, and the run stops at the first rung that does
not hold: later work goes into that rung (the world, the base or the budget), never past it. A finished stage is
recorded in DIR/stages.json with what it measured and its time, and is kept when the run starts again; the base's
training resumes from its last checkpoint. Commit DIR after each stage (the full run's is study/weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from na_engine.errors import NestedAttentionError, command_line

from . import config, world


class Run:
    def __init__(self, out: str, cfg: config.Config, quick: bool, docs: str | None = None, readme: str | None = None):
        self.out, self.cfg, self.quick, self.docs, self.readme = out, cfg, quick, docs, readme
        os.makedirs(out, exist_ok=True)
        self.record_path = os.path.join(out, "stages.json")
        self.stages = json.load(open(self.record_path)) if os.path.isfile(self.record_path) else {}
        settings = dataclasses.asdict(cfg) | {"quick": quick}
        settings = json.loads(json.dumps(settings))  # as the record holds them (tuples as lists)
        before = self.stages.get("config", {})  # a field added since the run started is taken at its value now
        changed = sorted(k for k in before if before[k] != settings.get(k))
        if changed:
            raise NestedAttentionError(
                f"{out} holds a run with other settings ({', '.join(changed)}); use another --out."
            )
        self.stages["config"] = settings

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
        record["stage_seconds"] = round(time.time() - t0 + record.pop("seconds_before_resume", 0.0), 1)
        self.stages[name] = record
        with open(self.record_path + ".tmp", "w") as f:
            json.dump(self.stages, f, indent=1)
        os.replace(self.record_path + ".tmp", self.record_path)
        self.log(f"{name}: done in {record['stage_seconds']:.0f} s")
        return record

    def products(self):
        return world.split(world.all_products(), self.cfg.heldout, self.cfg.world_seed)


def stage_world(run: Run) -> dict:
    train, heldout = run.products()
    with open(run.path("world.json"), "w") as f:
        json.dump({"train": [p.name for p in train], "heldout": [p.name for p in heldout]}, f, indent=1)
    return {"train_products": len(train), "heldout_products": len(heldout)}


def stage_reader(run: Run) -> dict:
    from . import evaluate

    products = world.all_products()[:: max(1, len(world.all_products()) // run.cfg.reader_products)]
    ceiling = evaluate.reader_ceiling(products, run.cfg.reader_scenes, run.cfg.seed)
    run.log(f"R0 reader on true renders: identity {ceiling['identity']['mean']:.3f} (n {ceiling['n']})")
    return {"true_renders": ceiling}


def stage_autoencoder(run: Run) -> dict:
    from . import base, evaluate

    train, _ = run.products()
    renders = base.Renders(train, run.cfg.base_renders_per_product, run.cfg.seed)
    vae = base.train_autoencoder(run.cfg, renders.pixels, run.log)
    vae.save_pretrained(run.path("autoencoder"))
    products = world.all_products()[:: max(1, len(world.all_products()) // run.cfg.reader_products)]
    through = evaluate.reader_ceiling(products, run.cfg.reader_scenes, run.cfg.seed, lambda x: base.round_trip(vae, x))
    run.log(f"R0 reader through the autoencoder: identity {through['identity']['mean']:.3f}")
    return {"through_autoencoder": through}


def stage_base(run: Run) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from . import base

    train, _ = run.products()
    renders = base.Renders(train, run.cfg.base_renders_per_product, run.cfg.seed)
    vae = AutoencoderKL.from_pretrained(run.path("autoencoder")).eval().requires_grad_(False)
    latents = base.latent_means(vae, renders.pixels) * vae.config.scaling_factor
    folder = run.path("base")
    base.write_tokenizer(os.path.join(folder, "tokenizer"), world.words(), base.MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    trained = base.train_base(run.cfg, run.path("training"), latents, renders, tokenizer, run.log)
    base.save_pipeline(folder, vae, trained["text"], trained["unet"])
    return {"renders": len(renders), "final_losses": trained["losses"]}


def stage_described(run: Run) -> dict:
    from . import evaluate, report

    train, heldout = run.products()
    args = (run.cfg.steps, run.cfg.guidance)
    held, cases, images = evaluate.described(run.path("base"), heldout, run.cfg.r1_cases, run.cfg.seed + 11, *args)
    report.pairs_grid(cases, images, run.path("described_heldout.png"))
    seen, _, _ = evaluate.described(run.path("base"), train, run.cfg.r1_cases, run.cfg.seed + 12, *args)
    run.log(f"R1 described identity: held-out {held['identity']['mean']:.3f}, train {seen['identity']['mean']:.3f}")
    return {"heldout": held, "train": seen}


def stage_encoders(run: Run) -> dict:
    from . import encoders

    train, _ = run.products()
    return encoders.build(run.path("encoders"), run.path("base"), train, run.cfg, run.log)


def stage_fit(run: Run) -> dict:
    from . import evaluate, report

    train, _ = run.products()
    pairs = evaluate.with_references(train, run.cfg.r2_cases, run.cfg.seed + 21)
    fit, images = evaluate.personalised(run.out, "nested", pairs, run.cfg.steps, run.cfg.guidance)
    report.pairs_grid([c for c, _ in pairs], images, run.path("fit_nested.png"), references=[r for _, r in pairs])
    run.log(f"R2 fit: nested brings back its training products at {fit['identity']['mean']:.3f}")
    return {"nested": fit}


def stage_class_word(run: Run) -> dict:
    from . import evaluate

    _, heldout = run.products()
    args = (run.cfg.r1_cases, run.cfg.seed + 11, run.cfg.steps, run.cfg.guidance)  # R1's held-out cases
    alone = evaluate.class_word_alone(run.path("base"), heldout, *args)
    run.log(f"R2 diagnosis: the look through the class word's state alone, identity {alone['identity']['mean']:.3f}")
    return {"heldout": alone}


def ladder(run: Run) -> dict:
    """Each rung's figures and whether it holds (None: not measured, because a lower rung failed or it is not
    built yet)."""
    cfg, stages = run.cfg, run.stages
    rungs: dict = {}
    if "reader" in stages:
        true = stages["reader"]["true_renders"]["identity"]["mean"]
        through = stages["autoencoder"]["through_autoencoder"]["identity"]["mean"] if "autoencoder" in stages else None
        rungs["r0"] = {
            "true_renders": true,
            "through_autoencoder": through,
            "bar": "identity read right >= 0.97 on true renders, >= 0.95 through the autoencoder",
            "holds": None if through is None else true >= 0.97 and through >= 0.95,
        }
    if "described" in stages:
        held = stages["described"]["heldout"]
        rungs["r1"] = {
            "identity": held["identity"]["mean"],
            "background": held["background"]["mean"],
            "placement": held["placement"]["mean"],
            "bar": f"identity >= {cfg.r1_identity}, background and placement >= {cfg.r1_scene}",
            "holds": held["identity"]["mean"] >= cfg.r1_identity
            and min(held["background"]["mean"], held["placement"]["mean"]) >= cfg.r1_scene,
        }
    if "fit" in stages:
        fit = stages["fit"]["nested"]["identity"]["mean"]
        rungs["r2"] = {"identity": fit, "bar": f"identity >= {cfg.r2_identity}", "holds": fit >= cfg.r2_identity}
        if "class_word" in stages:  # its diagnosis: the base told the look through the class word's state alone
            rungs["r2"]["base_look_through_class_word"] = stages["class_word"]["heldout"]["identity"]["mean"]
    for name in ("r0", "r1", "r2", "r3", "r4"):
        rungs.setdefault(name, {"holds": None})
    return rungs


STAGES = [
    ("world", stage_world, None),
    ("reader", stage_reader, None),
    ("autoencoder", stage_autoencoder, None),
    ("base", stage_base, "r0"),  # the base is built on a reader that holds
    ("described", stage_described, "r0"),
    ("encoders", stage_encoders, "r1"),  # subjects are trained on a base that draws what it is told
    ("fit", stage_fit, "r1"),
    ("class_word", stage_class_word, "r1"),  # R2's diagnosis: can the class word's value carry the look at all?
]


def run_study(run: Run, until: str | None = None) -> dict:
    for name, fn, needs in STAGES:
        if run.cfg.gated and needs is not None and ladder(run)[needs]["holds"] is not True:
            run.log(f"{name}: not attempted, {needs.upper()} does not hold")
            break
        run.stage(name, fn)
        if name == until:
            break
    results = {"ladder": ladder(run), "stages": {k: v for k, v in run.stages.items() if k != "config"}}
    results["run_seconds"] = round(sum(v.get("stage_seconds", 0) for v in results["stages"].values()), 1)
    with open(run.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    from . import report

    report.write(run, results)
    return results


@command_line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the ladder, stage by stage (each cached and resumable)")
    r.add_argument("--out", required=True, help="folder of the run's stages")
    r.add_argument("--quick", action="store_true", help="toy scale: checks the pipeline and formats, not the numbers")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a study/config.py field")
    r.add_argument("--until", choices=[name for name, _, _ in STAGES], help="stop after this stage")
    r.add_argument("--docs", help="write STUDY.md's ladder block and the figures and results.json under DOCS/study")
    r.add_argument("--readme", help="fill this README's <!-- study:start --> ... <!-- study:end --> block")
    d = sub.add_parser("demo", help="held-out products put into new scenes with the committed weights (a grid)")
    d.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "weights"), help="a full run's folder")
    d.add_argument("--out", required=True, help="folder for the references, the images and grid.png")
    args = p.parse_args(argv)
    if args.command == "demo":
        from . import report

        print(f"[study] demo: {report.demo(args.weights, args.out)}")
        return 0
    try:
        cfg = config.override(config.QUICK if args.quick else config.FULL, args.set)
    except ValueError as e:
        raise NestedAttentionError(str(e)) from None
    import torch

    torch.set_num_threads(cfg.threads)
    run_study(Run(args.out, cfg, args.quick, args.docs, args.readme), args.until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
