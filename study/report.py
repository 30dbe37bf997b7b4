"""The report: STUDY.md, the trade-off plot and the sample grids, all made from results.json and the samples.

Plots are drawn with Pillow (no plotting library is a dependency of the project).
"""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

from .evaluate import METHODS, multi_cases, reference_photo, single_cases

COLOURS = {"nested": (200, 40, 40), "bridge": (40, 90, 200), "decoupled": (40, 150, 60), "single_token": (150, 90, 20)}
CELL = 128  # grid cell side in pixels


def _label(draw: ImageDraw.ImageDraw, xy, text: str, fill=(0, 0, 0)) -> None:
    draw.text(xy, text, fill=fill)


def tradeoff_plot(sweep: dict, path: str, size=(560, 420)) -> None:
    """Identity top-1 (y) against background accuracy (x), one line per method over the strengths."""
    w, h = size
    left, right, top, bottom = 60, 20, 20, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    ymax = max(0.05, max(p["identity_top1"] for pts in sweep.values() for p in pts)) * 1.1

    def at(x, y):
        return left + x * (w - left - right), h - bottom - (y / ymax) * (h - top - bottom)

    for i in range(6):
        x, y = at(i / 5, ymax * i / 5)
        _label(d, (x - 10, h - bottom + 5), f"{i / 5:.1f}")
        _label(d, (5, y - 5), f"{ymax * i / 5:.2f}")
    _label(d, (w // 2 - 60, h - 20), "background accuracy (prompt)")
    _label(d, (5, 2), "identity top-1")
    for k, (method, points) in enumerate(sweep.items()):
        xy = [at(p["background_acc"], p["identity_top1"]) for p in points]
        d.line(xy, fill=COLOURS[method], width=2)
        for p, (x, y) in zip(points, xy):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[method])
            _label(d, (x + 4, y - 12), f"{p['strength']:g}", COLOURS[method])
        _label(d, (left + 10, top + 8 + 14 * k), method, COLOURS[method])
    img.save(path)


def _cell(image: Image.Image, caption: str = "") -> Image.Image:
    out = Image.new("RGB", (CELL, CELL + 14), "white")
    out.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (0, 14))
    _label(ImageDraw.Draw(out), (2, 1), caption)
    return out


def _grid(rows: list[list[Image.Image]], header: list[str]) -> Image.Image:
    cols = len(header)
    grid = Image.new("RGB", (cols * CELL, 16 + len(rows) * (CELL + 14)), "white")
    d = ImageDraw.Draw(grid)
    for c, name in enumerate(header):
        _label(d, (c * CELL + 4, 2), name)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * CELL, 16 + r * (CELL + 14)))
    return grid


def sample_grid(run_dir: str, heldout, results: dict, path: str) -> None:
    s = results["settings"]
    cases = single_cases(heldout, s["samples"], s["seed"])
    resolution = _resolution(run_dir)
    rows = []
    for k, case in enumerate(cases):
        row = [_cell(reference_photo(case.reference, resolution), case.reference.background)]
        for m in METHODS:
            row.append(_cell(Image.open(os.path.join(run_dir, "eval", "samples", f"{m}_{k}.png")), _short(case)))
        rows.append(row)
    _grid(rows, ["reference", *METHODS]).save(path)


def multi_grid(run_dir: str, heldout, results: dict, path: str) -> None:
    s = results["settings"]
    pairs = multi_cases(heldout, s["samples"], s["seed"])
    resolution = _resolution(run_dir)
    rows = []
    for k, (prompt, refs, _) in enumerate(pairs):
        row = [_cell(reference_photo(r, resolution), r.products[0].identity.kind) for r in refs]
        for m in ("decoupled", "bridge", "nested"):
            image = Image.open(os.path.join(run_dir, "eval", "samples", f"multi_{m}_{k}.png"))
            row.append(_cell(image, prompt.background))
        rows.append(row)
    _grid(rows, ["reference 1", "reference 2", "decoupled", "bridge", "nested"]).save(path)


def maps_grid(run_dir: str, count: int, path: str) -> None:
    panels = [
        Image.open(p)
        for p in (os.path.join(run_dir, "eval", "samples", f"nested_{k}.maps.png") for k in range(count))
        if os.path.isfile(p)
    ]
    if not panels:
        return
    w, h = panels[0].size
    scale = max(1, 384 // h)
    out = Image.new("RGB", (w * scale, h * scale * len(panels)), "white")
    for i, p in enumerate(panels):
        out.paste(p.resize((w * scale, h * scale), Image.NEAREST), (0, i * h * scale))
    out.save(path)


def _short(case) -> str:
    p = case.prompt.products[0]
    return f"{case.prompt.background} {p.placement[0]} {p.size[0]}"


def _resolution(run_dir: str) -> int:
    with open(os.path.join(run_dir, "base", "study_base.json")) as f:
        return int(json.load(f)["resolution"])


def _row(name: str, r: dict) -> str:
    def f(key):
        lo, hi = r[key + "_ci95"]
        return f"{r[key]:.3f} [{lo:.2f}, {hi:.2f}]"

    keys = ("identity_top1", "identity_cos", "background_acc", "placement_acc", "size_acc", "background_leak")
    return f"| {name} | " + " | ".join(f(k) for k in keys) + f" | {r['n']} |"


def markdown(results: dict, stages: dict, figures: str) -> str:
    m, chance = results["methods"], results["chance_top1"]
    lines = [
        "# The study: nested attention in a miniature product world",
        "",
        "Generated by `python -m study run` from `results.json`; every number below comes from that command.",
        "",
        f"Held-out identities: {results['heldout_identities']} (chance top-1 {chance:.3f}); "
        f"the probe's top-1 on fresh held-out renders, its ceiling: {results['probe_render_top1']:.3f}.",
        "",
        "## Main table (held-out identities, reference in another scene)",
        "",
        "| method | identity top-1 | identity cos | background | placement | size | background leak | n |",
        "|---|---|---|---|---|---|---|---|",
        *[_row(name, m[name]) for name in METHODS],
        "",
        "95% Wilson intervals for proportions, normal intervals for the mean cosine.",
        "",
        "## Two subjects in one image",
        "",
        "| method | identity top-1 (per half) | swap/blend rate | background | n |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {r['identity_top1']:.3f} | {r['swap_rate']:.3f} | {r['background_acc']:.3f} | {r['n']} |"
            for name, r in results["multi"].items()
        ],
        "",
        "## Identity against the prompt (strength 0 to 2)",
        "",
        f"![trade-off]({figures}/tradeoff.png)",
        "",
        "| method | trigger weight | identity top-1 | background | placement | leak |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {p['trigger_weight']:g} | {p['identity_top1']:.3f} | {p['background_acc']:.3f} | "
            f"{p['placement_acc']:.3f} | {p['background_leak']:.3f} |"
            for name, pts in results["trigger_weight_sweep"].items()
            for p in pts
        ],
        "",
        "## Samples",
        "",
        f"![samples]({figures}/samples.png)",
        "",
        f"![two subjects]({figures}/multi.png)",
        "",
        "Attention maps of nested samples (where the trigger attends | which subject token each pixel reads | "
        "the reference coloured by token):",
        "",
        f"![maps]({figures}/maps.png)",
        "",
        "## Stages",
        "",
        "```json",
        json.dumps({k: v for k, v in stages.items() if k != "report"}, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, heldout, out_dir: str, md_path: str, stages: dict) -> dict:
    """The figures into out_dir and STUDY.md at md_path (its image links relative to it)."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    tradeoff_plot(results["sweep"], os.path.join(out_dir, "tradeoff.png"))
    sample_grid(run_dir, heldout, results, os.path.join(out_dir, "samples.png"))
    multi_grid(run_dir, heldout, results, os.path.join(out_dir, "multi.png"))
    maps_grid(run_dir, min(4, results["settings"]["samples"]), os.path.join(out_dir, "maps.png"))
    figures = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(md_path)))
    with open(md_path, "w") as f:
        f.write(markdown(results, stages, figures))
    return {"figures": sorted(os.listdir(out_dir)), "markdown": md_path}
