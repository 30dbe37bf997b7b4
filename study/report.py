"""The report: STUDY.md, the trade-off plot and the sample grids, all made from results.json and the samples.

Plots are drawn with Pillow (no plotting library is a dependency of the project).
"""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

from . import metrics
from .evaluate import multi_cases, reference_photo, single_cases
from .methods import MULTI_METRICS, SINGLE_METRICS, TRAINED, in_table

COLOURS = {"nested": (200, 40, 40), "bridge": (40, 90, 200), "decoupled": (40, 150, 60), "single_token": (150, 90, 20)}
CELL = 128  # grid cell side in pixels


def _label(draw: ImageDraw.ImageDraw, xy, text: str, fill=(0, 0, 0)) -> None:
    draw.text(xy, text, fill=fill)


def tradeoff_plot(tradeoff: dict, path: str, size=(560, 420)) -> None:
    """Identity top-1 (y) against the prompt's product attributes kept (x), one line per method over strengths."""
    w, h = size
    left, right, top, bottom = 60, 20, 20, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    ymax = max(0.05, max(p["identity_top1"] for pts in tradeoff.values() for p in pts)) * 1.1

    def at(x, y):
        return left + x * (w - left - right), h - bottom - (y / ymax) * (h - top - bottom)

    for i in range(6):
        x, y = at(i / 5, ymax * i / 5)
        _label(d, (x - 10, h - bottom + 5), f"{i / 5:.1f}")
        _label(d, (5, y - 5), f"{ymax * i / 5:.2f}")
    _label(d, (w // 2 - 100, h - 20), "attribute accuracy (pose, light, cap: the prompt's)")
    _label(d, (5, 2), "identity top-1")
    for k, (method, points) in enumerate(tradeoff.items()):
        colour = COLOURS.get(method, (90, 90, 90))
        xy = [at(p["attribute_acc"], p["identity_top1"]) for p in points]
        d.line(xy, fill=colour, width=2)
        for p, (x, y) in zip(points, xy):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            _label(d, (x + 4, y - 12), f"{p['strength']:g}", colour)
        _label(d, (left + 10, top + 8 + 14 * k), method, colour)
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
        row = [_cell(reference_photo(case.reference, resolution), "reference")]
        for m in in_table("main"):
            row.append(_cell(Image.open(os.path.join(run_dir, "eval", "samples", f"{m}_{k}.png")), _short(case)))
        rows.append(row)
    _grid(rows, ["reference", *in_table("main")]).save(path)


def multi_grid(run_dir: str, heldout, results: dict, path: str) -> None:
    s = results["settings"]
    pairs = multi_cases(heldout, min(s["samples"], s["multi_cases"]), s["seed"])
    resolution = _resolution(run_dir)
    rows = []
    for k, (prompt, refs, _) in enumerate(pairs):
        row = [_cell(reference_photo(r, resolution), r.products[0].identity.kind) for r in refs]
        for m in in_table("multi"):
            image = Image.open(os.path.join(run_dir, "eval", "samples", f"multi_{m}_{k}.png"))
            row.append(_cell(image, prompt.background))
        rows.append(row)
    _grid(rows, ["reference 1", "reference 2", *in_table("multi")]).save(path)


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
    """The prompt in a few letters: background, placement and size initials, and its marked attributes."""
    p = case.prompt.products[0]
    marks = "".join({"pose": "P", "light": "L", "cap": "C"}[a] for a in sorted(p.marked))
    return f"{case.prompt.background} {p.placement[0]}{p.size[0]} {marks}".strip()


def _resolution(run_dir: str) -> int:
    with open(os.path.join(run_dir, "base", "study_base.json")) as f:
        return int(json.load(f)["resolution"])


def _ci(r: dict, key: str) -> str:
    lo, hi = r[key + "_ci95"]
    return f"{r[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def _yes(holds: bool) -> str:
    return "yes" if holds else "**no**"


def _curve(points: list[dict]):
    """A method's trade-off as (identity, attribute accuracy) sorted by identity, for interpolation."""
    import numpy as np

    pts = sorted((p["identity_top1"], p["attribute_acc"]) for p in points)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def matched_attributes(tradeoff: dict, a: str, b: str, levels: int = 5) -> dict | None:
    """Attribute accuracy of a and b at the same identity: both curves interpolated at ``levels`` identities
    spread over the range both reach; None when their identity ranges do not overlap."""
    import numpy as np

    (xa, ya), (xb, yb) = _curve(tradeoff[a]), _curve(tradeoff[b])
    low, high = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if high <= low:
        return None
    at = np.linspace(low, high, levels)
    diff = np.interp(at, xa, ya) - np.interp(at, xb, yb)
    return {"identity_range": [round(float(low), 3), round(float(high), 3)], "mean_difference": float(diff.mean())}


def claims(results: dict) -> list[tuple[str, str, str]]:
    """The paper's claims as the study's issue transposed them: (claim, what was measured, verdict)."""
    m, multi = results["methods"], results["multi"]
    nested, single, base = m["nested"], m["single_token"], m["base"]
    paired = results["paired"]
    share = results["base"]["trigger_share"]
    p_single = paired["nested_vs_single_token_identity"]
    p_swap = paired["nested_vs_decoupled_swap"]
    matched = matched_attributes(results["tradeoff"], "nested", "decoupled")
    swap_n, swap_d = multi["nested"], multi["decoupled"]
    rows = [
        (
            "the base follows the prompt: background >= 0.9, placement >= 0.8",
            f"{_ci(base, 'background_acc')}; {_ci(base, 'placement_acc')}",
            _yes(base["background_acc"] >= 0.9 and base["placement_acc"] >= 0.8),
        ),
        (
            "the base's class word localises: share on its product >= 3x elsewhere",
            f"{share['product']:.3f} vs {share['elsewhere']:.3f} ({share['product'] / share['elsewhere']:.1f}x)",
            _yes(share["product"] >= 3 * share["elsewhere"]),
        ),
        (
            "nested identity top-1 >= 0.5",
            f"{_ci(nested, 'identity_top1')} (chance {results['chance_top1']:.3f})",
            _yes(nested["identity_top1"] >= 0.5),
        ),
        (
            "nested identity above single_token, p < 0.05",
            f"{_ci(nested, 'identity_top1')} vs {_ci(single, 'identity_top1')}; cases only nested identifies "
            f"{p_single['a_higher']}, only single_token {p_single['b_higher']}: "
            f"sign test p = {p_single['sign_test_p']:.3f}",
            _yes(nested["identity_top1"] > single["identity_top1"] and p_single["sign_test_p"] < 0.05),
        ),
        (
            "at matched identity, nested keeps the attributes at least as well as decoupled",
            "identity ranges do not overlap"
            if matched is None
            else f"nested minus decoupled {matched['mean_difference']:+.3f} attribute accuracy over identity "
            f"{matched['identity_range'][0]:.2f}-{matched['identity_range'][1]:.2f}",
            "not comparable" if matched is None else _yes(matched["mean_difference"] >= 0),
        ),
        (
            "two subjects: nested swap rate <= 0.2 and below decoupled, p < 0.05",
            f"{_ci(swap_n, 'swap_rate')} vs {_ci(swap_d, 'swap_rate')}; images where nested swaps less "
            f"{p_swap['b_higher']}, more {p_swap['a_higher']}: sign test p = {p_swap['sign_test_p']:.3f}",
            _yes(
                swap_n["swap_rate"] <= 0.2
                and swap_n["swap_rate"] < swap_d["swap_rate"]
                and p_swap["sign_test_p"] < 0.05
            ),
        ),
    ]
    if "run_seconds" in results:
        seconds = results["run_seconds"]
        rows.append(
            ("a run from nothing in <= 3 h", f"{seconds:.0f} s = {seconds / 3600:.2f} h", _yes(seconds <= 10800))
        )
    return rows


def metric_table(rows: dict, metric_list) -> list[str]:
    """A table of ``rows`` (name -> cell) with a column per metric, each value with its 95% interval."""
    return [
        "| method | " + " | ".join(m.label for m in metric_list) + " | n |",
        "|---|" + "---|" * (len(metric_list) + 1),
        *[
            f"| {name} | " + " | ".join(_ci(r, m.key) for m in metric_list) + f" | {r['n']} |"
            for name, r in rows.items()
        ],
    ]


def main_table(results: dict) -> list[str]:
    return metric_table(results["methods"], SINGLE_METRICS)


def share_section(results: dict) -> list[str]:
    share = results["base"]["trigger_share"]
    lines = [
        "## Where the class word attends (the base)",
        "",
        f"The class word's attention share on its product's pixels and elsewhere, while the base draws "
        f"{share['n']} held-out one-product prompts (mean over each layer's sampling steps and queries):",
        "",
        "| layer | on the product | elsewhere | ratio |",
        "|---|---|---|---|",
        *[
            f"| {name} | {v['product']:.3f} | {v['elsewhere']:.3f} | {v['product'] / max(v['elsewhere'], 1e-6):.1f} |"
            for name, v in share["layers"].items()
        ],
        f"| **mean over layers** | {share['product']:.3f} | {share['elsewhere']:.3f} | "
        f"{share['product'] / max(share['elsewhere'], 1e-6):.1f} |",
        "",
    ]
    before = results["base"].get("trigger_share_round1")
    if before:
        lines += [
            f"Before the localisation loss (the first round's base, measured the same way: {before['what']}): "
            f"{before['product']:.3f} on the product, {before['elsewhere']:.3f} elsewhere "
            f"({before['product'] / before['elsewhere']:.1f}x).",
            "",
        ]
    return lines


def markdown(results: dict, stages: dict, figures: str, analysis: str, run_dir: str) -> str:
    chance, s = results["chance_top1"], results["settings"]
    lines = [
        "# The study: nested attention in a miniature product world",
        "",
        "Generated by `python -m study run` from `results.json`; every number below comes from that command.",
        "",
        f"Held-out identities: {results['heldout_identities']} (chance top-1 {chance:.3f}); "
        f"the probe's top-1 on fresh held-out renders, its ceiling: {results['probe_render_top1']:.3f}.",
        "",
        "## The claims checked",
        "",
        "| claim | measured | holds |",
        "|---|---|---|",
        *[f"| {c} | {v} | {verdict} |" for c, v, verdict in claims(results)],
        "",
        'A verdict follows the claim\'s point comparison; "intervals overlap" marks one the 95% intervals do not '
        'separate, "a tie" equal values. Paired tests compare the same cases (prompt, reference, seed).',
        "",
        "## Main table (held-out identities; the reference contradicts the prompt in scene and attributes)",
        "",
        *main_table(results),
        "",
        "95% Wilson intervals for proportions, normal intervals for the mean cosine. Pose, light and cap: the "
        "prompt's value read from the pixels, where the reference always shows the other value.",
        "",
        "Ceilings, on the same cases: the true product rendered in the prompt's scene, and that render through "
        "the base's VAE:",
        "",
        *metric_table(results["ceiling"], SINGLE_METRICS),
        "",
        "## Two subjects in one image",
        "",
        *metric_table(results["multi"], MULTI_METRICS),
        "",
        "Each half of an image is read against its own subject: own when it is the probe's top-1 among the held-out "
        "products, swap when the other subject is, blend otherwise. The image is the unit (its two halves average), "
        "so n counts images.",
        "",
        f"## Identity against the prompt ({s['tradeoff_cases']} cases a point)",
        "",
        f"![trade-off]({figures}/tradeoff.png)",
        "",
        "| method | strength | identity top-1 | attribute accuracy |",
        "|---|---|---|---|",
        *[
            f"| {name} | {p['strength']:g} | {_ci(p, 'identity_top1')} | {_ci(p, 'attribute_acc')} |"
            for name, pts in results["tradeoff"].items()
            for p in pts
        ],
        "",
        *share_section(results),
        "## Samples",
        "",
        f"![samples]({figures}/samples.png)",
        "",
        "Each cell's caption: the prompt's background, placement and size initials, and its marked attributes "
        "(P lying, L lit from the left, C with a cap).",
        "",
        f"![two subjects]({figures}/multi.png)",
        "",
        "Attention maps of nested samples (where the trigger attends | which subject token each pixel reads | "
        "the reference coloured by token):",
        "",
        f"![maps]({figures}/maps.png)",
        "",
        *training_losses(run_dir),
        *([analysis.strip(), ""] if analysis else []),
        "## Stages",
        "",
        "```json",
        json.dumps({k: v for k, v in stages.items() if k != "report"}, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


def training_losses(run_dir: str, last: int = 1000) -> list[str]:
    """The encoders' training loss over their last steps, and each method's difference from nested.

    Every trained method has nested's seed and random streams, so step s saw the same images, references,
    noise and timesteps: the differences are paired. Empty when the loss logs are absent."""
    import numpy as np

    curves = {}
    for m in TRAINED:
        path = os.path.join(run_dir, "encoders", "adapters", f"{m}_run", "loss.csv")
        if os.path.isfile(path):
            with open(path) as f:
                curves[m] = np.array([float(line.split(",")[1]) for line in f.read().splitlines()[1:]])[-last:]
    if "nested" not in curves:
        return []
    ref = curves["nested"]
    lines = ["| method | mean loss, last steps | minus nested [95%, paired] |", "|---|---|---|"]
    for m, c in curves.items():
        if m == "nested":
            lines.append(f"| {m} | {c.mean():.4f} | |")
            continue
        low, high = metrics.mean_interval(c - ref)
        lines.append(f"| {m} | {c.mean():.4f} | {c.mean() - ref.mean():+.4f} [{low:+.4f}, {high:+.4f}] |")
    return [f"Training loss of the encoders over their last {len(ref)} steps:", "", *lines, ""]


README_START, README_END = "<!-- study:start -->", "<!-- study:end -->"


def verdict_line(results: dict) -> str:
    """How many of the study's claims hold, and which do not, in one sentence for the README."""
    rows = claims(results)
    failed = [c for c, _, verdict in rows if verdict != "yes"]
    head = f"**Claims that hold: {len(rows) - len(failed)} of {len(rows)}.**"
    return head if not failed else head + " Not holding: " + "; ".join(failed) + "."


def readme_section(results: dict, figures: str) -> str:
    """The README's block: the sample grid, the main table, what the world proves and what it does not."""
    return "\n".join(
        [
            README_START,
            "## Does it work? A miniature world, trained here",
            "",
            "Every model below was trained from scratch on a 2-core CPU (the CLIP vision tower stays random), on "
            "procedural products (bottles, boxes, mugs with continuous colours and patterns), by this project's own "
            "trainer and generator; the "
            f"{results['heldout_identities']} products shown were never seen in training. Each row: the reference "
            "photo, then one prompt through each method (base: no subject). The reference contradicts the prompt: "
            "another scene, and the product's pose, light and cap at their other values. Identity top-1 is the "
            f"probe's retrieval among the {results['heldout_identities']} held-out products (chance "
            f"{results['chance_top1']:.3f}); the rest is read from the pixels against the prompt.",
            "",
            f"![study samples]({figures}/samples.png)",
            "",
            *main_table(results),
            "",
            verdict_line(results),
            "",
            "It shows the whole path working end to end (base model, encoder training, nested layer, "
            "generation) and how nested attention compares with its baselines under equal budgets; it does not "
            "show quality on real photographs or SDXL, which needs the released weights. Claims, sweeps, "
            "two-subject results and the analysis: [docs/STUDY.md](docs/STUDY.md) (`python -m study run`).",
            README_END,
        ]
    )


def update_readme(path: str, section: str) -> bool:
    """Replace the block between the markers; False (and nothing written) when the README has none."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    with open(path, "w") as f:
        f.write(head + section + rest.split(README_END, 1)[1])
    return True


def write_report(
    run_dir: str, heldout, out_dir: str, md_path: str, stages: dict, analysis: str = "", readme: str | None = None
) -> dict:
    """The figures into out_dir, STUDY.md at md_path and, given ``readme``, its block between the markers
    (image links relative to each file)."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    tradeoff_plot(results["tradeoff"], os.path.join(out_dir, "tradeoff.png"))
    sample_grid(run_dir, heldout, results, os.path.join(out_dir, "samples.png"))
    multi_grid(run_dir, heldout, results, os.path.join(out_dir, "multi.png"))
    maps_grid(run_dir, min(4, results["settings"]["samples"]), os.path.join(out_dir, "maps.png"))
    figures = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(md_path)))
    with open(md_path, "w") as f:
        f.write(markdown(results, stages, figures, analysis, run_dir))
    record = {"figures": sorted(os.listdir(out_dir)), "markdown": md_path}
    if readme:
        figures = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(readme)))
        if not update_readme(readme, readme_section(results, figures)):
            raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to fill.")
        record["readme"] = readme
    return record
