"""The evaluation: every method generates the same held-out cases, read by the fixed probe and pixel metrics.

A case is a held-out identity, a prompt scene and a reference scene that differs from it in background,
placement and size. The reference is the product's box cropped from its render, background included
(as a user crops a product photo), so a method that copies the reference's background is caught.
Each cell (method x setting) is generated through na_engine's NestedGenerator and cached in
DIR/eval/<cell>.json, so an interrupted evaluation continues where it stopped.

Methods: base (strength 0: no subject), single_token, decoupled (IP-Adapter's added attention),
bridge (the decoupled file read as nested, no training) and nested.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from . import metrics, probe, world


@dataclass
class EvalConfig:
    cases: int = 200  # per cell of the main and multi-subject tables
    sweep_cases: int = 40  # per point of the sweeps (fewer than the tables' 200: 23 points)
    strengths: tuple = (0.0, 0.5, 1.0, 1.5, 2.0)
    trigger_weights: tuple = (1.0, 2.0, 4.0, 8.0)
    steps: int = 25
    cfg: float = 4.0
    samples: int = 8  # images kept per method for the report
    seed: int = 1000


QUICK = EvalConfig(cases=4, sweep_cases=2, strengths=(0.0, 1.0), trigger_weights=(1.0, 4.0), steps=3, samples=2)
ADAPTER = {"single_token": "single_token", "decoupled": "decoupled", "bridge": "decoupled", "nested": "nested"}
MODE = {"decoupled": "decoupled"}  # every other method acts nested


@dataclass(frozen=True)
class Case:
    identity: world.Identity
    prompt: world.Scene
    reference: world.Scene
    seed: int


def single_cases(heldout, count: int, seed: int) -> list[Case]:
    """Held-out identities in turn; the reference scene differs from the prompt's in all three attributes."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        ident = heldout[k % len(heldout)]
        prompt = world.random_scene(rng, ident)
        p = prompt.products[0]
        reference = world.Scene(
            _other(rng, list(world.BACKGROUNDS), prompt.background),
            [
                world.Placed(
                    ident, _other(rng, list(world.PLACEMENTS), p.placement), _other(rng, list(world.SIZES), p.size)
                )
            ],
        )
        out.append(Case(ident, prompt, reference, seed + k))
    return out


def multi_cases(heldout, count: int, seed: int) -> list[tuple]:
    """(left identity, right identity, prompt scene, two reference scenes, seed): two kinds, held out."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for k in range(count):
        first = heldout[k % len(heldout)]
        others = [i for i in heldout if i.kind != first.kind]
        second = others[int(rng.integers(len(others)))]
        prompt = world.random_scene(rng, first, second)
        refs = [
            world.Scene(
                _other(rng, list(world.BACKGROUNDS), prompt.background),
                [world.Placed(i, str(rng.choice(list(world.PLACEMENTS))), "large")],
            )
            for i in (first, second)
        ]
        out.append((prompt, refs, seed + 10_000 + k))
    return out


def _other(rng, names: list, avoid: str) -> str:
    rest = [n for n in names if n != avoid]
    return rest[int(rng.integers(len(rest)))]


def reference_photo(scene: world.Scene, resolution: int) -> Image.Image:
    """The product's box (10% margin) cut from its render, background kept."""
    image, mask = world.render(scene, resolution)
    left, top, right, bottom = mask.getbbox()
    mx, my = (right - left) // 10, (bottom - top) // 10
    return image.crop(
        (max(0, left - mx), max(0, top - my), min(image.width, right + mx), min(image.height, bottom + my))
    )


class Evaluator:
    def __init__(self, run_dir: str, heldout, cfg: EvalConfig, log=print):
        from na_engine.formats import load_adapter
        from na_engine.standalone.generate import NestedGenerator
        from na_engine.standalone.models import load_base, load_vision

        self.dir, self.cfg, self.log, self.heldout = os.path.join(run_dir, "eval"), cfg, log, heldout
        os.makedirs(os.path.join(self.dir, "samples"), exist_ok=True)
        base, vision = (
            load_base(os.path.join(run_dir, "base")),
            load_vision(os.path.join(run_dir, "encoders", "vision")),
        )
        adapters = os.path.join(run_dir, "encoders", "adapters")
        self.generators = {
            name: NestedGenerator(base, vision, load_adapter(os.path.join(adapters, f"{name}.safetensors")), "cpu")
            for name in sorted(set(ADAPTER.values()))
        }
        any_pipe = next(iter(self.generators.values())).pipe
        self.resolution = int(base.unet.config.sample_size) * any_pipe.vae_scale_factor
        with open(os.path.join(run_dir, "probe", "probe.json")) as f:
            made = json.load(f)["config"]  # the gallery the probe stage measured its ceiling with
        model = probe.load_probe(os.path.join(run_dir, "probe"))
        self.gallery = probe.Gallery(model, heldout, self.resolution, made["gallery_renders"], made["seed"])
        self.settings = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
        self._subjects = {}

    def generator(self, method: str):
        """The method's generator: its adapter's (base: the nested one's, at strength 0)."""
        return self.generators[ADAPTER.get(method) or (method if method in self.generators else "nested")]

    def add_adapter(self, name: str, path: str) -> None:
        """A further adapter, evaluated as the method ``name`` (nested)."""
        from na_engine.formats import load_adapter
        from na_engine.standalone.generate import NestedGenerator

        nested = self.generators["nested"]
        self.generators[name] = NestedGenerator(nested.base, nested.vision, load_adapter(path), "cpu")

    def subject(self, method: str, scene: world.Scene):
        key = (method, id(scene))
        if key not in self._subjects:
            photo = reference_photo(scene, self.resolution)
            kind = scene.products[0].identity.kind
            self._subjects[key] = self.generator(method).encode([photo], kind, mode=MODE.get(method, "nested"))
        return self._subjects[key]

    def generate(self, method: str, prompt: world.Scene, refs, seed: int, strength: float, weight: float, maps=False):
        subjects = [self.subject(method, r) for r in refs]
        return self.generator(method)(
            world.caption(prompt),
            subjects,
            seed,
            self.cfg.steps,
            self.cfg.cfg,
            self.resolution,
            strength=0.0 if method == "base" else strength,
            maps=maps,
            trigger_weight=weight,
        )

    def cell(self, name: str, fn) -> dict:
        """fn's result, cached in eval/<name>.json under these settings (other settings: computed again)."""
        path = os.path.join(self.dir, name + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == self.settings:
                return cached
        self.log(f"evaluate: {name}")
        result = {**fn(), "settings": self.settings}
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        return result

    # -- the cells ----------------------------------------------------------------------------

    def single(self, method: str, cases, strength=1.0, weight=1.0, keep=0, rows=False) -> dict:
        """The cell's rates; ``rows`` keeps each case's readings too (for paired comparisons)."""
        readings = []
        for k, case in enumerate(cases):
            image, panel = self.generate(
                method, case.prompt, [case.reference], case.seed, strength, weight, maps=k < keep
            )
            if k < keep:
                image.save(os.path.join(self.dir, "samples", f"{method}_{k}.png"))
                if panel is not None and method == "nested":
                    panel.save(os.path.join(self.dir, "samples", f"{method}_{k}.maps.png"))
            readings.append(self.read_single(image, case))
        return summarise(readings) | ({"rows": readings} if rows else {})

    def read_single(self, image: Image.Image, case: Case) -> dict:
        p = case.prompt.products[0]
        background = metrics.read_background(image)
        sims = self.gallery.similarities(probe.crop(image))
        own = self.gallery.position(case.identity.index)
        return {
            "background": background == case.prompt.background,
            "placement": metrics.read_placement(image) == p.placement,
            "size": metrics.read_size(image) == p.size,
            "leak": background == case.reference.background,
            "top1": sims is not None and int(np.argmax(sims)) == own,
            "cos": float(sims[own]) if sims is not None else 0.0,
        }

    @torch.no_grad()
    def ceiling(self, cases, through_vae: bool) -> dict:
        """The readings of the true product rendered in each prompt's scene, raw or encoded and decoded by the
        base's VAE: what a method that drew the product exactly could score, before and after the VAE."""
        vae = self.generators["nested"].base.vae
        readings = []
        for case in cases:
            image, _ = world.render(case.prompt, self.resolution)
            if through_vae:
                x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
                y = vae.decode(vae.encode(x).latent_dist.mean).sample[0]  # (3, R, R) in [-1, 1]
                image = Image.fromarray(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            readings.append(self.read_single(image, case))
        return summarise(readings)

    @torch.no_grad()
    def vision_retrieval(self, cases, per_identity: int = 4) -> dict:
        """What the encoders' input holds: top-1 retrieval of each case's reference photo among the held-out
        identities by its CLIP vision features (penultimate, mean over patches, cosine to each identity's mean over
        reference photos in other random scenes). Low here would mean identity is lost before any encoder."""
        from na_engine.standalone.models import image_features

        vision = self.generators["nested"].vision
        rng = np.random.default_rng(self.cfg.seed + 7)

        def embed(photos) -> torch.Tensor:  # (n, E), unit length
            return torch.nn.functional.normalize(image_features(vision, photos, "cpu").mean(1), dim=-1)

        def identity_mean(identity) -> torch.Tensor:  # (E,): its photos in random scenes
            photos = [reference_photo(world.random_scene(rng, identity), self.resolution) for _ in range(per_identity)]
            return torch.nn.functional.normalize(embed(photos).mean(0), dim=-1)

        gallery = torch.stack([identity_mean(i) for i in self.heldout])  # (H, E)
        refs = embed([reference_photo(c.reference, self.resolution) for c in cases])  # (cases, E)
        hits = (refs @ gallery.T).argmax(1).tolist()
        own = [self.gallery.position(c.identity.index) for c in cases]
        return _rates(identity_top1=[h == o for h, o in zip(hits, own)]) | {"n": len(cases)}

    @torch.no_grad()
    def trigger_share(self, cases) -> dict:
        """The attention the trigger word receives, p(q), which scales nested's correction at a pixel: its mean
        over the layers and steps of nested generations, on the prompt's product pixels and on the rest."""
        product, rest = [], []
        for case in cases:
            self.generate("nested", case.prompt, [case.reference], case.seed, 1.0, 1.0, maps=True)
            capture = self.generators["nested"].capture
            share = (capture.outer[0][0, 0] / capture.calls).numpy()  # (h, w): the mean over layers and steps
            _, mask = world.render(case.prompt, self.resolution)
            inside = np.asarray(mask.resize(share.shape[::-1], Image.BOX), dtype=np.float32) / 255 > 0.5
            if inside.any() and not inside.all():
                product.append(share[inside].mean())
                rest.append(share[~inside].mean())
        summary = {"product": np.mean(product), "background": np.mean(rest)}
        return {k: round(float(v), 4) for k, v in summary.items()} | {"n": len(product)}

    def multi(self, method: str, cases, keep=0) -> dict:
        top1, swaps, backgrounds = [], [], []
        for k, (prompt, refs, seed) in enumerate(cases):
            image, _ = self.generate(method, prompt, refs, seed, 1.0, 1.0)
            if k < keep:
                image.save(os.path.join(self.dir, "samples", f"multi_{method}_{k}.png"))
            backgrounds.append(metrics.read_background(image) == prompt.background)
            placed = [p.identity.index for p in prompt.products]
            for p, other in zip(prompt.products, reversed(placed)):
                half = (0.0, 0.5) if p.placement == "left" else (0.5, 1.0)
                sims = self.gallery.similarities(probe.crop(image, half))
                own, theirs = self.gallery.position(p.identity.index), self.gallery.position(other)
                top1.append(sims is not None and int(np.argmax(sims)) == own)
                swaps.append(sims is not None and sims[theirs] > sims[own])
        return {**_rates(identity_top1=top1, swap_rate=swaps, background_acc=backgrounds), "n": len(cases)}


def _rates(**values) -> dict:
    """name=list of booleans -> {name: proportion, name_ci95: its 95% Wilson interval}."""
    out = {}
    for name, v in values.items():
        n, k = len(v), int(sum(bool(x) for x in v))
        low, high = metrics.proportion_interval(k, n)
        out[name], out[name + "_ci95"] = round(k / n, 4) if n else 0.0, [round(low, 4), round(high, 4)]
    return out


def summarise(rows: list[dict]) -> dict:
    cos = np.array([r["cos"] for r in rows])
    half = 1.96 * cos.std(ddof=1) / np.sqrt(len(cos)) if len(cos) > 1 else 0.0
    return {
        **_rates(
            identity_top1=[r["top1"] for r in rows],
            background_acc=[r["background"] for r in rows],
            placement_acc=[r["placement"] for r in rows],
            size_acc=[r["size"] for r in rows],
            background_leak=[r["leak"] for r in rows],
        ),
        "identity_cos": round(float(cos.mean()), 4),
        "identity_cos_ci95": [round(float(cos.mean() - half), 4), round(float(cos.mean() + half), 4)],
        "n": len(rows),
    }


METHODS = ("base", "single_token", "decoupled", "bridge", "nested")


def evaluate(run_dir: str, heldout, cfg: EvalConfig, log=print) -> dict:
    """Every cell, then results.json's dictionary."""
    ev = Evaluator(run_dir, heldout, cfg, log)
    cases = single_cases(heldout, cfg.cases, cfg.seed)
    pairs = multi_cases(heldout, cfg.cases, cfg.seed)
    results = {
        "heldout_identities": len(heldout),
        "chance_top1": round(1 / len(heldout), 4),
        "settings": asdict(cfg),
        "methods": {m: ev.cell(f"main_{m}", lambda m=m: ev.single(m, cases, keep=cfg.samples)) for m in METHODS},
        "multi": {
            m: ev.cell(f"multi_{m}", lambda m=m: ev.multi(m, pairs, keep=cfg.samples))
            for m in ("decoupled", "bridge", "nested")
        },
    }
    results["ceiling"] = {
        name: _without_settings(ev.cell(f"ceiling_{name}", lambda v=v: ev.ceiling(cases, v)))
        for name, v in (("render", False), ("vae", True))
    }
    results["ceiling"]["vision_features"] = _without_settings(
        ev.cell("ceiling_vision", lambda: ev.vision_retrieval(cases))
    )
    few = cases[: cfg.sweep_cases]

    def point(method: str, strength: float, weight: float = 1.0) -> dict:
        """One sweep point; strength 0 is the base for every method, and weight 1 is the strength sweep's point."""
        name = "sweep_base_0.0" if strength == 0 else f"sweep_{method}_{strength}"
        name = name if weight == 1 else f"weight_{method}_{weight}"
        who = "base" if strength == 0 else method
        return _point(ev.cell(name, lambda: ev.single(who, few, strength=strength, weight=weight)))

    results["sweep"] = {
        m: [{"strength": s, **point(m, s)} for s in cfg.strengths] for m in ("nested", "bridge", "decoupled")
    }
    results["trigger_share"] = _without_settings(ev.cell("trigger_share", lambda: ev.trigger_share(few)))
    results["trigger_weight_sweep"] = {
        m: [{"trigger_weight": w, **point(m, 1.0, w)} for w in cfg.trigger_weights] for m in ("nested", "bridge")
    }
    results["bridge_trigger_weight"] = confirm_bridge_weight(ev, results["trigger_weight_sweep"]["bridge"], heldout)
    return results


CONFIRM_SEED = 50_000  # fresh cases: none is among the sweep's


def confirm_bridge_weight(ev: Evaluator, sweep: list[dict], heldout) -> dict:
    """The bridge's recommended trigger weight: the sweep's best (ties: the smaller weight), then checked
    against weight 1 on fresh cases, paired (same case and seed), with an exact sign test on the pairs
    where only one of the two identifies the product."""
    best = max(sweep, key=lambda p: (p["identity_top1"], -p["trigger_weight"]))["trigger_weight"]
    fresh = single_cases(heldout, ev.cfg.cases, ev.cfg.seed + CONFIRM_SEED)
    cells = {
        w: ev.cell(f"confirm_bridge_{w}", lambda w=w: ev.single("bridge", fresh, weight=w, rows=True))
        for w in (1.0, best)
    }
    ones, bests = [r["top1"] for r in cells[1.0]["rows"]], [r["top1"] for r in cells[best]["rows"]]
    only_best = sum(b and not o for o, b in zip(ones, bests))
    only_one = sum(o and not b for o, b in zip(ones, bests))
    return {
        "chosen": best,
        "rule": "the bridge's trigger-weight sweep point with the highest identity top-1 (ties: the smaller weight)",
        "confirm": {str(w): _point(c) for w, c in cells.items()},
        "pairs_only_chosen": only_best,
        "pairs_only_weight_1": only_one,
        "sign_test_p": round(metrics.sign_test(only_best, only_one), 4),
    }


def _without_settings(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k != "settings"}


def _point(cell: dict) -> dict:
    keys = ("identity_top1", "identity_top1_ci95", "background_acc", "placement_acc", "background_leak", "n")
    return {k: cell[k] for k in keys}
