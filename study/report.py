"""The report: STUDY.md, the trade-off plot and the sample grids, all made from results.json and the samples.

Plots are drawn with Pillow (no plotting library is a dependency of the project).
"""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

from . import metrics
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


def _ci(r: dict, key: str) -> str:
    lo, hi = r[key + "_ci95"]
    return f"{r[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def _verdict(holds: bool, a: dict, b: dict, key: str) -> str:
    """yes / **no**, and whether the two cells' 95% intervals separate them."""
    if a[key] == b[key]:
        return "yes (a tie)" if holds else "**no** (a tie)"
    apart = a[key + "_ci95"][0] > b[key + "_ci95"][1] or b[key + "_ci95"][0] > a[key + "_ci95"][1]
    return ("yes" if holds else "**no**") + ("" if apart else " (intervals overlap)")


def claims(results: dict) -> list[tuple[str, str, str]]:
    """The paper's claims as the study's issue transposed them: (claim, what was measured, verdict)."""
    m, multi, chance = results["methods"], results["multi"], results["chance_top1"]
    nested, decoupled, single, base = m["nested"], m["decoupled"], m["single_token"], m["base"]
    top1 = nested["identity_top1"]
    p_single = metrics.cells_p(nested, single, "identity_top1")
    return [
        (
            "the base follows the prompt: background >= 0.9",
            _ci(base, "background_acc"),
            "yes" if base["background_acc"] >= 0.9 else "**no**",
        ),
        (
            "nested identity top-1 >= 10x chance",
            f"{top1:.3f} = {top1 / chance:.1f}x chance {chance:.3f}",
            "yes" if top1 >= 10 * chance else "**no**",
        ),
        (
            "nested identity above single_token",
            f"{_ci(nested, 'identity_top1')} vs {_ci(single, 'identity_top1')}; two-proportion p = {p_single:.3f}",
            _verdict(top1 > single["identity_top1"], nested, single, "identity_top1"),
        ),
        (
            "nested identity above base",
            f"{_ci(nested, 'identity_top1')} vs {_ci(base, 'identity_top1')}",
            _verdict(top1 > base["identity_top1"], nested, base, "identity_top1"),
        ),
        (
            "nested background >= decoupled",
            f"{_ci(nested, 'background_acc')} vs {_ci(decoupled, 'background_acc')}",
            _verdict(nested["background_acc"] >= decoupled["background_acc"], nested, decoupled, "background_acc"),
        ),
        (
            "nested background leak <= decoupled",
            f"{_ci(nested, 'background_leak')} vs {_ci(decoupled, 'background_leak')}",
            _verdict(nested["background_leak"] <= decoupled["background_leak"], nested, decoupled, "background_leak"),
        ),
        (
            "two subjects: nested swap rate < decoupled",
            f"{_ci(multi['nested'], 'swap_rate')} vs {_ci(multi['decoupled'], 'swap_rate')}",
            _verdict(
                multi["nested"]["swap_rate"] < multi["decoupled"]["swap_rate"],
                multi["nested"],
                multi["decoupled"],
                "swap_rate",
            ),
        ),
    ]


def followup_section(results: dict) -> list[str]:
    """Nested trained at a raised trigger weight (study/followup.py), beside the main table's nested row."""
    if "followup" not in results:
        return []
    f, nested = results["followup"], results["methods"]["nested"]
    w = f["trigger_weight"]
    return [
        f"## Follow-up: nested trained at trigger weight {w:g}",
        "",
        "Run after the evaluation to test its explanation (study/followup.py): the same trainer, data and budget as "
        f"nested, with the trigger's attention multiplied by {w:g} in training and sampling (the weight fixed by rule "
        "before training: the bridge's chosen one); the main table's cases, seeds, probe and metrics. Not a method "
        "of the main table.",
        "",
        *method_table({"nested": nested, f"nested trained at weight {w:g}": f["main"]}),
        "",
        f"Identity top-1 against nested: two-proportion p = {f['p_vs_nested']:.3f}; training loss over its last "
        f"tenth {f['training']['final_loss']:.4f}.",
        "",
    ]


def method_table(rows: dict) -> list[str]:
    """The main table's columns for ``rows`` (name -> cell), each value with its 95% interval."""
    keys = ("identity_top1", "identity_cos", "background_acc", "placement_acc", "size_acc", "background_leak")
    return [
        "| method | identity top-1 | identity cos | background | placement | size | background leak | n |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {name} | " + " | ".join(_ci(r, k) for k in keys) + f" | {r['n']} |" for name, r in rows.items()],
    ]


def main_table(results: dict) -> list[str]:
    return method_table(results["methods"])


def markdown(results: dict, stages: dict, figures: str, analysis: str, run_dir: str) -> str:
    chance, bridge = results["chance_top1"], results["bridge_trigger_weight"]
    n_sweep = results["settings"]["sweep_cases"]
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
        'separate, "a tie" equal values.',
        "",
        "## Main table (held-out identities, reference in another scene)",
        "",
        *main_table(results),
        "",
        "95% Wilson intervals for proportions, normal intervals for the mean cosine.",
        "",
        "Ceilings, on the same cases: the true product rendered in the prompt's scene reads identity top-1 "
        f"{_ci(results['ceiling']['render'], 'identity_top1')}; the same render encoded and decoded by the base's "
        f"VAE reads {_ci(results['ceiling']['vae'], 'identity_top1')}. No method that goes through this VAE can "
        "be expected above the second. What the encoders receive: the reference photo's CLIP vision features "
        "retrieve its product among the held-out ones with top-1 "
        f"{_ci(results['ceiling']['vision_features'], 'identity_top1')} (mean-pooled features, nearest identity).",
        "",
        "## Two subjects in one image",
        "",
        "| method | identity top-1 (per half) | swap/blend rate (per half) | background | prompts |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {_ci(r, 'identity_top1')} | {_ci(r, 'swap_rate')} | {_ci(r, 'background_acc')} | {r['n']} |"
            for name, r in results["multi"].items()
        ],
        "",
        "Each prompt has two halves, each read against its own subject and the other one.",
        "",
        f"## Identity against the prompt (strength 0 to 2, {n_sweep} cases a point)",
        "",
        f"![trade-off]({figures}/tradeoff.png)",
        "",
        "| method | strength | identity top-1 [95%] | background | placement | leak |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {p['strength']:g} | {_ci(p, 'identity_top1')} | {p['background_acc']:.3f} | "
            f"{p['placement_acc']:.3f} | {p['background_leak']:.3f} |"
            for name, pts in results["sweep"].items()
            for p in pts
        ],
        "",
        f"## Trigger weight ({n_sweep} cases a point, strength 1)",
        "",
        "| method | trigger weight | identity top-1 [95%] | background | placement | leak |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {p['trigger_weight']:g} | {_ci(p, 'identity_top1')} | {p['background_acc']:.3f} | "
            f"{p['placement_acc']:.3f} | {p['background_leak']:.3f} |"
            for name, pts in results["trigger_weight_sweep"].items()
            for p in pts
        ],
        "",
        f"The attention the trigger word receives, p(q), which scales nested's correction at a pixel (mean over "
        f"layers and steps of {results['trigger_share']['n']} nested generations at weight 1): "
        f"{results['trigger_share']['product']:.3f} on the product's pixels, "
        f"{results['trigger_share']['background']:.3f} elsewhere.",
        "",
        f"The bridge's recommended trigger weight, chosen by rule ({bridge['rule']}): **{bridge['chosen']:g}**. "
        f"Checked against weight 1 on {results['settings']['cases']} fresh cases, paired:",
        "",
        "| bridge trigger weight | identity top-1 | background | placement | leak |",
        "|---|---|---|---|---|",
        *[
            f"| {w} | {_ci(p, 'identity_top1')} | {p['background_acc']:.3f} | {p['placement_acc']:.3f} | "
            f"{p['background_leak']:.3f} |"
            for w, p in bridge["confirm"].items()
        ],
        "",
        f"Cases only the chosen weight identifies: {bridge['pairs_only_chosen']}; only weight 1: "
        f"{bridge['pairs_only_weight_1']}; exact sign test p = {bridge['sign_test_p']:.3f}.",
        "",
        *followup_section(results),
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
        *training_losses(run_dir),
        *([analysis.strip(), ""] if analysis else []),
        "## Stages",
        "",
        "```json",
        json.dumps({k: v for k, v in stages.items() if k != "report"}, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


def training_losses(
    run_dir: str,
    methods=("nested", "single_token", "decoupled", "nested_trained_weight"),
    paired=("single_token", "decoupled"),
    last: int = 1000,
) -> list[str]:
    """The encoders' training loss over their last steps, and each method's difference from nested.

    The methods of ``paired`` were trained with nested's seed and random streams, so step s saw the same
    images, noise and timesteps: their differences are paired. The follow-up was trained after the
    trainer's per-row random streams changed, so its steps saw other draws: its interval is unpaired.
    Empty when the loss logs are absent."""
    import numpy as np

    curves = {}
    for m in methods:
        path = os.path.join(run_dir, "encoders", "adapters", f"{m}_run", "loss.csv")
        if os.path.isfile(path):
            with open(path) as f:
                curves[m] = np.array([float(line.split(",")[1]) for line in f.read().splitlines()[1:]])[-last:]
    if "nested" not in curves:
        return []
    ref = curves["nested"]
    lines = ["| method | mean loss, last steps | minus nested [95%] |", "|---|---|---|"]
    for m, c in curves.items():
        if m == "nested":
            lines.append(f"| {m} | {c.mean():.4f} | |")
            continue
        d = c.mean() - ref.mean()
        if m in paired:
            half, kind = 1.96 * (c - ref).std(ddof=1) / np.sqrt(len(c)), "paired"
        else:
            half, kind = 1.96 * np.sqrt(c.var(ddof=1) / len(c) + ref.var(ddof=1) / len(ref)), "unpaired"
        lines.append(f"| {m} | {c.mean():.4f} | {d:+.4f} [{d - half:+.4f}, {d + half:+.4f}] {kind} |")
    return [f"Training loss of the encoders over their last {len(ref)} steps:", "", *lines, ""]


README_START, README_END = "<!-- study:start -->", "<!-- study:end -->"


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
            "photo, then one prompt through each method (base: no subject). Identity top-1 is the probe's retrieval "
            f"among the {results['heldout_identities']} held-out products (chance {results['chance_top1']:.3f}); "
            "background, placement and size are read from the pixels against the prompt.",
            "",
            f"![study samples]({figures}/samples.png)",
            "",
            *main_table(results),
            "",
            *_followup_line(results),
            "It shows the whole path working end to end (base model, encoder training, nested layer, "
            "generation) and how nested attention compares with its baselines under equal budgets; it does not "
            "show quality on real photographs or SDXL, which needs the released weights. Claims, sweeps, "
            "two-subject results and the analysis: [docs/STUDY.md](docs/STUDY.md) (`python -m study run`).",
            README_END,
        ]
    )


def _followup_line(results: dict) -> list[str]:
    if "followup" not in results:
        return []
    f = results["followup"]
    return [
        f"A follow-up testing why nested is not ahead (its trigger word gets little attention): nested trained and "
        f"sampled at trigger weight {f['trigger_weight']:g} reaches identity top-1 {_ci(f['main'], 'identity_top1')} "
        f"(p = {f['p_vs_nested']:.3f} against nested).",
        "",
    ]


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
    tradeoff_plot(results["sweep"], os.path.join(out_dir, "tradeoff.png"))
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
