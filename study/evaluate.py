"""The evaluation: every method generates the same held-out cases, read by the fixed probe and pixel metrics.

A case is a held-out identity, a prompt scene and a reference scene that contradicts it: another
background, placement and size, and every product attribute (pose, light, cap) at its other value. The
reference is the product's box cut from its render, background included (as a user crops a product photo),
so a method that copies the reference instead of following the prompt is caught by the attribute readings.
Each cell (method x setting) is generated through na_engine's NestedGenerator and cached in
DIR/eval/<cell>.json with its per-case readings, so an interrupted evaluation continues where it stopped
and methods can be compared case by case (same prompt, reference and seed).

The methods and metrics are study.methods'. Tables:
- main: one product; every SINGLE_METRICS reading;
- multi: two products of two kinds, each with its own reference; each half of the image is read against
  its own subject: "own" when its own subject is the probe's top-1 among the held-out products, "swap" when
  the other subject is, "blend" otherwise (both or neither). The image is the unit: its two halves average.
- tradeoff: identity against the prompt's product attributes as the subject's strength grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from . import metrics, probe, world
from .methods import ATTRIBUTE_METRICS, METHODS, MULTI_METRICS, SINGLE_METRICS, TRAINED, Metric, in_table


@dataclass
class EvalConfig:
    cases: int = 150  # per cell of the main table
    multi_cases: int = 100  # two-product images per cell
    tradeoff_cases: int = 50  # per point of the trade-off (the main cells' first ones at strength 1)
    strengths: tuple = (0.0, 0.5, 1.0, 2.0, 3.0)
    steps: int = 25
    cfg: float = 4.0
    samples: int = 8  # images kept per method for the report
    seed: int = 1000


QUICK = EvalConfig(cases=4, multi_cases=2, tradeoff_cases=2, strengths=(0.0, 1.0, 2.0), steps=3, samples=2)


@dataclass(frozen=True)
class Case:
    identity: world.Identity
    prompt: world.Scene
    reference: world.Scene
    seed: int


def _other(rng, names: list, avoid: str) -> str:
    rest = [n for n in names if n != avoid]
    return rest[int(rng.integers(len(rest)))]


def single_cases(heldout, count: int, seed: int) -> list[Case]:
    """Held-out identities in turn; the reference differs from the prompt in every scene and product attribute."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        ident = heldout[k % len(heldout)]
        prompt = world.random_scene(rng, ident)
        p = prompt.products[0]
        flipped = p.flipped()
        placed = world.Placed(
            ident,
            _other(rng, list(world.PLACEMENTS), p.placement),
            _other(rng, list(world.SIZES), p.size),
            flipped.marked,
        )
        reference = world.Scene(_other(rng, list(world.BACKGROUNDS), prompt.background), [placed])
        out.append(Case(ident, prompt, reference, seed + k))
    return out


def multi_cases(heldout, count: int, seed: int) -> list[tuple]:
    """(prompt scene, two reference scenes, seed): two held-out products of two kinds, attributes at their defaults."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for k in range(count):
        first = heldout[k % len(heldout)]
        others = [i for i in heldout if i.kind != first.kind]
        second = others[int(rng.integers(len(others)))]
        prompt = world.random_scene(rng, first, second, attributes=False)
        refs = [
            world.Scene(
                _other(rng, list(world.BACKGROUNDS), prompt.background),
                [world.Placed(i, str(rng.choice(list(world.PLACEMENTS))), "large")],
            )
            for i in (first, second)
        ]
        out.append((prompt, refs, seed + 10_000 + k))
    return out


def reference_photo(scene: world.Scene, resolution: int) -> Image.Image:
    """The product's box (10% margin) cut from its render, background kept."""
    image, mask = world.render(scene, resolution)
    left, top, right, bottom = mask.getbbox()
    mx, my = (right - left) // 10, (bottom - top) // 10
    return image.crop(
        (max(0, left - mx), max(0, top - my), min(image.width, right + mx), min(image.height, bottom + my))
    )


# -- summaries ------------------------------------------------------------------------------------


def summarise(rows: list[dict], metric_list) -> dict:
    """Per metric, the mean over rows and its 95% interval: Wilson over the rows for a rate (a row's value may be
    a fraction, e.g. an image's two halves), normal for a mean."""
    out = {}
    for m in metric_list:
        v = np.array([float(r[m.key]) for r in rows])
        n = len(v)
        if m.rate:
            low, high = metrics.proportion_interval(v.sum(), n)
        else:
            low, high = metrics.mean_interval(v)
        out[m.key] = round(float(v.mean()), 4) if n else 0.0
        out[m.key + "_ci95"] = [round(float(low), 4), round(float(high), 4)]
    return out | {"n": len(rows)}


def paired_sign(a: list[dict], b: list[dict], key: str) -> dict:
    """Case-by-case comparison of two cells on ``key``: cases where a is higher, where b is, exact sign test."""
    above = sum(float(x[key]) > float(y[key]) for x, y in zip(a, b))
    below = sum(float(x[key]) < float(y[key]) for x, y in zip(a, b))
    return {"a_higher": above, "b_higher": below, "sign_test_p": round(metrics.sign_test(above, below), 4)}


# -- the evaluator --------------------------------------------------------------------------------


class Evaluator:
    def __init__(
        self,
        run_dir: str,
        heldout,
        cfg: EvalConfig,
        log=print,
        folder: str = "eval",
        photo=None,
        base: str = "",
        adapters=tuple(TRAINED),
    ):
        """``heldout``: the identities cases are drawn from, and the probe's gallery; cells go to run_dir/folder;
        ``photo(scene, resolution)``: the reference a user would give (default reference_photo, background kept);
        ``base``: another base folder than the run's; ``adapters``: the TRAINED adapters loaded (none: the base
        alone, drawn with diffusers' own attention, so that a base of other widths than the adapters' reads too)."""
        from na_engine.families.unet import load_base
        from na_engine.formats import load_adapter
        from na_engine.standalone.generate import NestedGenerator
        from na_engine.standalone.models import load_vision

        self.dir, self.cfg, self.log, self.heldout = os.path.join(run_dir, folder), cfg, log, heldout
        self.reused_seconds = 0.0  # what the cells taken from the cache took to compute (a resumed stage's time)
        os.makedirs(os.path.join(self.dir, "samples"), exist_ok=True)
        self.base = load_base(base or os.path.join(run_dir, "base"))
        vision = load_vision(os.path.join(run_dir, "encoders", "vision"))
        weights = os.path.join(run_dir, "encoders", "adapters")
        self.generators = {
            name: NestedGenerator(self.base, vision, load_adapter(os.path.join(weights, f"{name}.safetensors")), "cpu")
            for name in adapters
        }
        self.plain = None if self.generators else NestedGenerator(self.base, vision, None, "cpu")
        any_pipe = (self.plain or next(iter(self.generators.values()))).pipe
        self.resolution = int(self.base.unet.config.sample_size) * any_pipe.vae_scale_factor
        with open(os.path.join(run_dir, "probe", "probe.json")) as f:
            made = json.load(f)["config"]  # the gallery the probe stage measured its ceiling with
        model = probe.load_probe(os.path.join(run_dir, "probe"))
        self.gallery = probe.Gallery(model, heldout, self.resolution, made["gallery_renders"], made["seed"])
        self.settings = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
        self._subjects = {}
        self.photo = photo or reference_photo

    def subject(self, method: str, scene: world.Scene):
        key = (method, id(scene))
        if key not in self._subjects:
            m = METHODS[method]
            photo = self.photo(scene, self.resolution)
            kind = scene.products[0].identity.kind
            self._subjects[key] = self.generators[m.adapter].encode([photo], kind, mode=m.mode)
        return self._subjects[key]

    def use_adapter(self, method: str, adapter) -> None:
        """Serve ``method``'s cells from another adapter from now on (subjects encoded before are dropped)."""
        from na_engine.standalone.generate import NestedGenerator

        first = self.generators[method]
        self.generators[method] = NestedGenerator(first.base, first.vision, adapter, "cpu")
        self._subjects.clear()

    def generate(self, method: str, prompt: world.Scene, refs, seed: int, strength: float = 1.0, maps=False):
        """One image of ``prompt`` with one subject per reference; ``strength`` multiplies the method's own."""
        m = METHODS[method]
        if self.plain is not None:  # the base alone: only a method without subject draws
            if m.strength * strength != 0:
                raise ValueError(f"{method} needs its adapter; this evaluator loaded none (the base alone)")
            caption = world.caption(prompt)
            return self.plain(caption, [], seed, self.cfg.steps, self.cfg.cfg, self.resolution, maps=False)
        subjects = [self.subject(method, r) for r in refs]
        if m.masked:  # each subject limited to its product's true region in the prompt's scene
            regions = world.product_masks(prompt, self.resolution)
            subjects = [
                s.with_(mask=torch.from_numpy(np.asarray(r, np.float32) / 255)) for s, r in zip(subjects, regions)
            ]
        return self.generators[m.adapter](
            world.caption(prompt),
            subjects,
            seed,
            self.cfg.steps,
            self.cfg.cfg,
            self.resolution,
            strength=m.strength * strength,
            maps=maps,
            trigger_weight=m.trigger_weight,
        )

    def cell(self, name: str, fn, inputs: str = "") -> dict:
        """fn's result, cached in eval/<name>.json under these settings and ``inputs`` (a text that changes with
        what the cell reads beyond the settings; other settings or inputs: computed again), with the seconds it
        took to compute."""
        path = os.path.join(self.dir, name + ".json")
        settings = self.settings + (":" + hashlib.sha256(inputs.encode()).hexdigest()[:12] if inputs else "")
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == settings:
                self.reused_seconds += cached.get("seconds", 0.0)  # cells from before timing count nothing
                return cached
        self.log(f"evaluate: {name}")
        t0 = time.time()
        result = {**fn(), "settings": settings}
        result["seconds"] = round(time.time() - t0, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        return result

    # -- readings ---------------------------------------------------------------------------------

    def read_single(self, image: Image.Image, case: Case) -> dict:
        """A value per SINGLE_METRICS key (booleans for rates)."""
        p = case.prompt.products[0]
        background = metrics.read_background(image)
        sims = self.gallery.similarities(probe.crop(image))
        own = self.gallery.position(case.identity.index)
        row = {
            "identity_top1": sims is not None and int(np.argmax(sims)) == own,
            "identity_cos": float(sims[own]) if sims is not None else 0.0,
            "background_acc": background == case.prompt.background,
            "placement_acc": metrics.read_placement(image) == p.placement,
            "size_acc": metrics.read_size(image) == p.size,
            "background_leak": background == case.reference.background,
        }
        for m, attribute in zip(ATTRIBUTE_METRICS, world.ATTRIBUTES):
            row[m.key] = metrics.READERS[attribute](image) == p.value(attribute)
        return row

    def read_multi(self, image: Image.Image, prompt: world.Scene) -> dict:
        """A value per MULTI_METRICS key: each half's own / swap / blend, averaged over the image's two halves."""
        placed = [p.identity.index for p in prompt.products]
        halves = []
        for p, other in zip(prompt.products, reversed(placed)):
            columns = (0.0, 0.5) if p.placement == "left" else (0.5, 1.0)
            sims = self.gallery.similarities(probe.crop(image, columns))
            top = None if sims is None else self.gallery.indices[int(np.argmax(sims))]
            halves.append((top == p.identity.index, top == other))
        own, swap = (float(np.mean([h[i] for h in halves])) for i in (0, 1))
        return {
            "identity_top1": own,
            "swap_rate": swap,
            "blend_rate": 1.0 - own - swap,
            "background_acc": metrics.read_background(image) == prompt.background,
        }

    # -- the cells --------------------------------------------------------------------------------

    def single(self, method: str, cases, strength: float = 1.0, keep: int = 0) -> dict:
        rows = []
        for k, case in enumerate(cases):
            image, panel = self.generate(method, case.prompt, [case.reference], case.seed, strength, maps=k < keep)
            if k < keep:
                image.save(os.path.join(self.dir, "samples", f"{method}_{k}.png"))
                if panel is not None and method == "nested":
                    panel.save(os.path.join(self.dir, "samples", f"{method}_{k}.maps.png"))
            rows.append(self.read_single(image, case))
        return summarise(rows, SINGLE_METRICS) | {"rows": rows}

    def multi(self, method: str, cases, keep: int = 0) -> dict:
        rows = []
        for k, (prompt, refs, seed) in enumerate(cases):
            image, _ = self.generate(method, prompt, refs, seed)
            if k < keep:
                image.save(os.path.join(self.dir, "samples", f"multi_{method}_{k}.png"))
            rows.append(self.read_multi(image, prompt))
        return summarise(rows, MULTI_METRICS) | {"rows": rows}

    @torch.no_grad()
    def ceiling(self, cases, through_vae: bool) -> dict:
        """The readings of the true product rendered in each prompt's scene, raw or encoded and decoded by the
        base's VAE: what a method that drew the product exactly could score, before and after the VAE."""
        images = [world.render(case.prompt, self.resolution)[0] for case in cases]
        if through_vae:
            images = probe.through_vae(self.base.vae, images)
        return summarise([self.read_single(image, case) for image, case in zip(images, cases)], SINGLE_METRICS)


def _attribute_acc(row: dict) -> float:
    return float(np.mean([row[m.key] for m in ATTRIBUTE_METRICS]))


def tradeoff_point(strength: float, rows: list[dict]) -> dict:
    """Identity top-1 and the mean of the attribute accuracies over ``rows``, with their intervals."""
    merged = [{"identity_top1": r["identity_top1"], "attribute_acc": _attribute_acc(r)} for r in rows]
    return {"strength": strength, **summarise(merged, [Metric("identity_top1", ""), Metric("attribute_acc", "")])}


def evaluate(run_dir: str, heldout, cfg: EvalConfig, log=print) -> tuple[dict, float]:
    """Every cell, then results.json's dictionary, and the seconds the cells found cached had taken."""
    ev = Evaluator(run_dir, heldout, cfg, log)
    cases = single_cases(heldout, cfg.cases, cfg.seed)
    pairs = multi_cases(heldout, cfg.multi_cases, cfg.seed)
    main = {m: ev.cell(f"main_{m}", lambda m=m: ev.single(m, cases, keep=cfg.samples)) for m in in_table("main")}
    multi = {m: ev.cell(f"multi_{m}", lambda m=m: ev.multi(m, pairs, keep=cfg.samples)) for m in in_table("multi")}
    few = cases[: cfg.tradeoff_cases]

    def point(method: str, strength: float) -> dict:
        if strength == 0:  # no subject: the base, for every method
            return tradeoff_point(0.0, main["base"]["rows"][: len(few)])
        if strength == 1:
            return tradeoff_point(1.0, main[method]["rows"][: len(few)])
        cell = ev.cell(f"tradeoff_{method}_{strength:g}", lambda: ev.single(method, few, strength=strength))
        return tradeoff_point(strength, cell["rows"])

    results = {
        "heldout_identities": len(heldout),
        "chance_top1": round(1 / len(heldout), 4),
        "settings": asdict(cfg),
        "methods": {m: summary_of(c) for m, c in main.items()},
        "attributes": {m: {k.key: c[k.key] for k in ATTRIBUTE_METRICS} for m, c in main.items()},
        "multi": {m: summary_of(c) for m, c in multi.items()},
        "tradeoff": {m: [point(m, s) for s in cfg.strengths] for m in in_table("tradeoff")},
        "paired": {
            "nested_vs_single_token_identity": paired_sign(
                main["nested"]["rows"], main["single_token"]["rows"], "identity_top1"
            ),
            "nested_vs_decoupled_swap": paired_sign(multi["nested"]["rows"], multi["decoupled"]["rows"], "swap_rate"),
        },
    }
    results["ceiling"] = {
        name: summary_of(ev.cell(f"ceiling_{name}", lambda v=v: ev.ceiling(cases, v)))
        for name, v in (("render", False), ("vae", True))
    }
    return results, ev.reused_seconds


def summary_of(cell: dict) -> dict:
    """A cell without its per-case rows, settings hash and time: what results.json keeps."""
    return {k: v for k, v in cell.items() if k not in ("rows", "settings", "seconds")}
