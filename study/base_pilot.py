"""python -m study base-pilot --out DIR --change NAME: one change to the base, read on what the base alone draws.

Round 6 (study/analysis.md) found that the base, told a product's look in words, draws it no better than the
adapters do, even a product it drew 42 times, and named the base's capacity as what to test next. This trains the
round's UNet and text encoder again with one change (CHANGES), on the round's own renders and schedule, with
the round's VAE kept (so its latents are the round's, encoded by the saved weights), then reads the round's base and
the changed one alone, on the same cases and noise, through the same path (evaluate.Evaluator with no adapter:
diffusers' own attention, so that a base of other widths than the adapters' reads too):
- described: the main table's cases with the product's look in the prompt (diagnose.described_base);
- described_drawn: the same on the products the base drew most (diagnose.described_drawn);
- plain: the main table's cases as the evaluation prompts them;
beside the class word's attention shares (base.trigger_shares) and the training loss's last 100 steps.

Writes DIR/base_pilot/<NAME>/ (the changed base, its training record and its cells), DIR/base_pilot/round/ (the
round's cells) and DIR/base_pilot_<NAME>.json.  The changed base's weights are not committed (.gitignore): where
they are missing, or were trained with another change or against another round base (its weights' fingerprint),
the command trains the base again and reads it afresh; the round's cells are read again when the round's base has
changed since.  Not a stage and not a claim: one change, one seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch

from . import base, diagnose, evaluate

FOLDER = "base_pilot"


@dataclass(frozen=True)
class Change:
    what: str
    width: float = 1.0  # times the round's UNet widths
    seed: int = 0  # added to the round's seed in training (initialisation, noise, batches); the renders stay


CHANGES = {
    "wider": Change(
        "the UNet 1.5 times as wide in every block (round 6: 32, 64, 128 channels; now 48, 96, 192), about 2.2 "
        "times the parameters; the same steps, data, seed, text encoder and VAE",
        width=1.5,
    ),
    "reseeded": Change(
        "round 6's base trained again at its own widths with another seed (the UNet's and text encoder's "
        "initialisation, noise and batch order), the same renders, steps and VAE: the run-to-run control for 'wider'",
        seed=1,
    ),
}


def changed_config(cfg: base.BaseConfig, change: Change) -> base.BaseConfig:
    widths = tuple(int(round(w * change.width)) for w in cfg.unet_widths)
    return replace(cfg, unet_widths=widths, seed=cfg.seed + change.seed)


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_changed(
    run_dir: str, folder: str, round_cfg: base.BaseConfig, cfg: base.BaseConfig, train_ids, heldout, log=print
) -> dict:
    """base.build_base with the round's VAE kept: the round's renders and latents, then the UNet and text encoder
    trained under ``cfg``; saves the folder and measures the class words' shares on the round's cases. Returns the
    training's record."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    renders = base.render_set(base.base_scenes(round_cfg, train_ids), cfg.resolution)
    log(f"base pilot: rendered {len(renders.images)} training images in {time.time() - t0:.0f} s")
    round_base = os.path.join(run_dir, "base")
    vae = AutoencoderKL.from_pretrained(os.path.join(round_base, "vae"), torch_dtype=torch.float32)
    vae.eval().requires_grad_(False)
    latents = base.latent_means(vae, renders.images) * vae.config.scaling_factor  # as the round's base trained on
    shutil.copytree(os.path.join(round_base, "tokenizer"), os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    unet, text, scheduler, losses = base.train_unet(cfg, latents, renders, tokenizer, log)
    parameters = _parameters(unet)
    base.save_pipeline(folder, vae, text, unet, scheduler, cfg)
    shares = base.trigger_shares(folder, heldout, cfg.share_cases, round_cfg.seed + 4)
    return {
        "unet_parameters": parameters,
        "final_losses": losses,
        "trigger_share": shares,
        "seconds": round(time.time() - t0, 1),
        "config": asdict(cfg),
    }


def read(run_dir: str, train, heldout, cfg: evaluate.EvalConfig, who: str, folder: str, log=print) -> dict:
    """The three readings' cells (rows kept) of the base in ``folder`` alone; cells go to DIR/base_pilot/<who>."""
    where = {"folder": os.path.join(FOLDER, who), "base": folder, "adapters": ()}
    ev = evaluate.Evaluator(run_dir, heldout, cfg, log, **where)
    cases = evaluate.single_cases(heldout, cfg.cases, cfg.seed)

    def plain():
        return ev.single("base", cases)

    return {
        "described": diagnose.described_base(ev, cases, rows=True),
        "described_drawn": diagnose.described_drawn(run_dir, train, len(heldout), cfg, log, rows=True, **where),
        "plain": {"what": f"the main table's {len(cases)} cases", "reading": ev.cell("main_base", plain)},
    }


def fingerprint(folder: str) -> str:
    """A base folder's weights, hashed: what the cells read from it depend on."""
    digest = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        for name in sorted(os.listdir(os.path.join(folder, part))):
            if name.endswith(".safetensors"):
                with open(os.path.join(folder, part, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def _current(record_path: str, cfg: base.BaseConfig, round_fingerprint: str) -> bool:
    """Whether the changed base and its cells were made with ``cfg`` against the round's base as it is now."""
    if not os.path.isfile(record_path) or not os.path.isdir(os.path.join(os.path.dirname(record_path), "base")):
        return False
    with open(record_path) as f:
        trained = json.load(f)
    same_config = trained["config"] == json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists
    return same_config and trained.get("round_base") == round_fingerprint


def _keep_round_cells(folder: str, round_fingerprint: str) -> None:
    """The round's cells stay while the round's base is the one they were read from (its fingerprint in the
    folder's round_base.txt); otherwise they go."""
    mark = os.path.join(folder, "round_base.txt")
    if os.path.isfile(mark):
        with open(mark) as f:
            if f.read() == round_fingerprint:
                return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(mark, "w") as f:
        f.write(round_fingerprint)


def _shares(record: dict) -> dict:
    return {k: record["trigger_share"][k] for k in ("product", "elsewhere")}


def base_pilot(run_dir: str, train, heldout, cfg: evaluate.EvalConfig, name: str, log=print) -> str:
    from na_engine.families.unet import load_base

    change = CHANGES[name]
    with open(os.path.join(run_dir, "stages.json")) as f:
        round_record = json.load(f)["base"]
    round_cfg = base.BaseConfig.from_record(round_record["config"])
    changed_cfg = changed_config(round_cfg, change)
    folder, round_base = os.path.join(run_dir, FOLDER, name), os.path.join(run_dir, "base")
    round_fingerprint = fingerprint(round_base)
    _keep_round_cells(os.path.join(run_dir, FOLDER, "round"), round_fingerprint)
    record_path = os.path.join(folder, "training.json")
    if not _current(record_path, changed_cfg, round_fingerprint):  # the record is written once the base is saved
        shutil.rmtree(folder, ignore_errors=True)  # cells read from another training of the base go with it
        os.makedirs(folder)
        log(f"base pilot: training the base with {change.what}")
        trained = train_changed(run_dir, os.path.join(folder, "base"), round_cfg, changed_cfg, train, heldout, log)
        with open(record_path, "w") as f:
            json.dump(trained | {"round_base": round_fingerprint}, f, indent=1)
    with open(record_path) as f:
        trained = json.load(f)
    round_parameters = _parameters(load_base(round_base).unet)
    readings = {
        who: read(run_dir, train, heldout, cfg, who, path, log)
        for who, path in (("round", round_base), (name, os.path.join(folder, "base")))
    }
    compared = {}
    for reading, was in readings["round"].items():
        now = readings[name][reading]
        if "reading" not in was:  # described_drawn where the base drew too few products
            compared[reading] = {"what": was["what"]}
            continue
        compared[reading] = {
            "what": was["what"],
            "round": evaluate.summary_of(was["reading"]),
            "changed": evaluate.summary_of(now["reading"]),
            "identity_changed_vs_round": evaluate.paired_sign(
                now["reading"]["rows"], was["reading"]["rows"], "identity_top1"
            ),
        }
    with open(os.path.join(run_dir, "eval", "main_base.json")) as f:  # the evaluation's base row, adapters installed
        evaluated = json.load(f)["rows"]
    result = {
        "what": "the round's base and the changed one alone, on the same cases and noise; one change, not a claim",
        "round_plain_is_the_evaluations": readings["round"]["plain"]["reading"]["rows"] == evaluated,
        "change": change.what,
        "command": f"python -m study base-pilot --out {run_dir} --change {name}",
        "training": {
            "round": {"unet_parameters": round_parameters, "final_losses": round_record["final_losses"]}
            | {"trigger_share": _shares(round_record), "seconds": round_record["seconds"]},
            "changed": {k: v for k, v in trained.items() if k not in ("trigger_share", "config", "round_base")}
            | {"trigger_share": _shares(trained)},
        },
        "readings": compared,
    }
    path = os.path.join(run_dir, f"{FOLDER}_{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
