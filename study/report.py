"""The report: the ladder as a table, the sample grids, results.json under DOCS/study, and the ladder's blocks in
docs/STUDY.md and the README (between their <!-- study:start --> and <!-- study:end --> markers)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from . import world

SCALE = 4  # grid pixels per world pixel
GRIDS = ("described_heldout.png", "fit_nested.png")  # the run's figures, copied under DOCS/study
RUNGS = {
    "r0": "R0 reader",
    "r1": "R1 the base draws what it is told",
    "r2": "R2 fit",
    "r3": "R3 generalise",
    "r4": "R4 the paper's claims",
}


def pairs_grid(cases: list, images: np.ndarray, path: str, references=None, count: int = 40, per_row: int = 8):
    """Up to ``count`` cases as ([the reference photo |] what was asked, unjittered | what was drawn), ``per_row``
    a row."""
    side = world.RESOLUTION
    refs = [[world.render(r)] for r in references] if references else [[]] * len(cases)
    pairs = [np.concatenate([*r, world.render(c.scene), im], 1) for c, im, r in zip(cases[:count], images, refs)]
    rows = [pairs[i : i + per_row] for i in range(0, len(pairs), per_row)]
    gap = np.full((side, 4, 3), 255, np.uint8)
    lines = []
    for row in rows:
        row = row + [np.full_like(row[0], 255)] * (per_row - len(row))
        lines.append(np.concatenate([x for pair in row for x in (pair, gap)], 1))
        lines.append(np.full((4, lines[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(lines)
    Image.fromarray(grid).resize((grid.shape[1] * SCALE, grid.shape[0] * SCALE), Image.NEAREST).save(path)


def _state(rung: dict) -> str:
    return {True: "holds", False: "does not hold", None: "not measured"}[rung["holds"]]


def ladder_table(results: dict) -> list[str]:
    lines = ["| rung | figures | bar | state |", "|---|---|---|---|"]
    for key, title in RUNGS.items():
        rung = results["ladder"][key]
        figures = ", ".join(f"{k} {v:.3f}" for k, v in rung.items() if isinstance(v, float))
        lines.append(f"| {title} | {figures or '—'} | {rung.get('bar', '—')} | {_state(rung)} |")
    return lines


def block(results: dict, figures: str) -> str:
    """The ladder's block: the table, the held-out grid and how to rerun it."""
    lines = ["## Does it work? The study's ladder", ""]
    lines += ladder_table(results)
    lines += [
        "",
        f"Every figure comes from `python -m study run --out study/weights` ({results['run_seconds']:.0f} s of "
        "stages on a 2-core CPU); `docs/study/results.json` holds them all with their intervals.",
    ]
    captions = {
        GRIDS[0]: "R1, held-out products (combinations never trained on), each pair: what the prompt named | what "
        "the base drew when told the product's look in words:",
        GRIDS[1]: "R2, training products, each triple: the reference photo (pose and light contradict the prompt) | "
        "what the prompt named | what nested drew from the reference and the plain prompt:",
    }
    for name in GRIDS:
        if os.path.isfile(os.path.join(figures, name)):
            link = os.path.relpath(os.path.join(figures, name), os.path.dirname(figures))
            lines += ["", captions[name], "", f"![{name}]({link})"]
    return "\n".join(lines) + "\n"


def fill(path: str, text: str) -> None:
    """Replace what lies between ``path``'s <!-- study:start --> and <!-- study:end --> lines with ``text``."""
    with open(path) as f:
        content = f.read()
    start, end = "<!-- study:start -->\n", "<!-- study:end -->"
    a, b = content.find(start), content.find(end)
    if a < 0 or b < a:
        raise SystemExit(f"{path} has no {start.strip()} ... {end} block to fill")
    with open(path, "w") as f:
        f.write(content[: a + len(start)] + text + content[b:])


def write(run, results: dict) -> None:
    if not run.docs:
        return
    figures = os.path.join(run.docs, "study")
    os.makedirs(figures, exist_ok=True)
    shutil.copyfile(run.path("results.json"), os.path.join(figures, "results.json"))
    for name in GRIDS:
        if os.path.isfile(run.path(name)):
            shutil.copyfile(run.path(name), os.path.join(figures, name))
    text = block(results, figures)
    fill(os.path.join(run.docs, "STUDY.md"), text)
    if run.readme:
        fill(run.readme, text.replace("](study/", "](docs/study/"))


DEMO_SCENES = [("white", "left", "large", "upright", "left"), ("black", "right", "small", "lying", "right")]


def demo(weights: str, out: str, count: int = 6) -> str:
    """Held-out products put into new scenes from one reference photo each, through the project's own command
    (`python -m na_engine generate --batch`, a CSV catalogue), with the committed study weights; returns the grid's
    path: reference | one image per DEMO_SCENES, a row per product."""
    import csv

    from na_engine.errors import NestedAttentionError
    from na_engine.standalone.generate import main as generate

    adapter = os.path.join(weights, "encoders", "adapters", "nested.safetensors")
    if not os.path.isfile(adapter):
        raise NestedAttentionError(f"{weights} holds no trained nested adapter yet: run python -m study run first")
    with open(os.path.join(weights, "world.json")) as f:  # the run's own split
        names = json.load(f)["heldout"]
    by_name = {p.name: p for p in world.all_products()}
    heldout = [by_name[name] for name in names]
    chosen = [heldout[k * len(heldout) // count] for k in range(count)]
    refs = os.path.join(out, "references")
    os.makedirs(refs, exist_ok=True)
    rows, grid_rows = [], []
    for product in chosen:
        scene = world.Scene("grey", [world.Placed(product, "centre", "large", "lying", "right")])
        Image.fromarray(world.render(scene)).save(os.path.join(refs, product.name + ".png"))
        for background, *placed in DEMO_SCENES:
            prompt = world.caption(world.Scene(background, [world.Placed(product, *placed)]))
            rows.append([prompt, f"references/{product.name}.png", product.kind, 1])
        grid_rows.append(world.render(scene))
    jobs = os.path.join(out, "catalogue.csv")
    with open(jobs, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "subject", "trigger", "seed"], *rows])
    images = os.path.join(out, "images")
    shutil.rmtree(images, ignore_errors=True)  # the grid reads the images in catalogue order
    args = ["--base", os.path.join(weights, "base"), "--clip-vision", os.path.join(weights, "encoders", "vision")]
    args += ["--adapter", adapter, "--batch", jobs, "--steps", "25", "--cfg", "1", "--size", str(world.RESOLUTION)]
    if generate([*args, "--out", images, "--no-maps"]) != 0:
        raise NestedAttentionError("the study demo's generation failed (its error is above)")
    drawn = sorted(f for f in os.listdir(images) if f.endswith(".png"))
    per = len(DEMO_SCENES)
    lines = [
        np.concatenate(
            [ref, *(np.asarray(Image.open(os.path.join(images, f))) for f in drawn[r * per : (r + 1) * per])], 1
        )
        for r, ref in enumerate(grid_rows)
    ]
    grid = np.concatenate(lines)
    path = os.path.join(out, "grid.png")
    Image.fromarray(grid).resize((grid.shape[1] * SCALE, grid.shape[0] * SCALE), Image.NEAREST).save(path)
    return path
