"""python -m study worth --out DIR: what the subject is worth to the denoiser, read from its loss.

Identity is lost between the tokens and the image (study/analysis.md): the pilot's tokens tell the held-out
products apart (retrieval 0.70), yet the image does not show them.  This reading asks why, at the noisy
end where identity is decided, without generating anything.

For each product, one target render (a random scene, its caption) is noised at TIMESTEPS with fixed noise,
and the base's v-prediction error is read inside the product's mask ("product") and outside it.  The same
noisy latents are denoised under each condition, so conditions are compared product by product:
- none: no subject (the base);
- per trained encoder, its tokens of a reference of the product in another scene: as evaluated (background
  kept), masked (background whitened), own (the target's own product on white: the crop round 1 trained on);
- wrong: the tokens of another product of the same kind, masked: what a subject gives that is not identity;
- optimised (nested and decoupled): tokens fitted to the product through the frozen adapter on OPTIMISE
  other renders of it, then read on the target: what the adapter path can carry at all (round 1's bound);
- nested/maps_optimised: nested's tokens and its per-layer maps (to_k, to_v) fitted together the same way,
  the maps at a tenth of the tokens' rate and put back after: whether the maps or the tokens are what is
  narrow, when nested's fitted tokens do less than a plain class-word offset (round 4);
- text/optimised: no subject, the class word's context moved by an offset fitted the same way (textual
  inversion at the text encoder's output): how far the base itself can be steered at the class word;
- text/described: no subject, the caption naming the product's look (world.appearance), as a share of the
  base's training captions did: what the base's own appearance words are worth (cached with its caption, and
  read again where the words have changed since).

The reading is the product-region error's change against none, in percent (negative: the subject helps),
and "identity": wrong minus masked, the part of the help that is this product's own.  Writes DIR/worth.json.
It is a reading beside the evaluation, not a claim.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import diagnose, evaluate, metrics, world
from .methods import TRAINED


@dataclass(frozen=True)
class WorthConfig:
    products: int = 60  # per set (held-out, seen)
    timesteps: tuple = (650, 800, 950)
    noises: int = 2  # per timestep
    optimised: int = 20  # products per set whose tokens are fitted (the first ones)
    optimise_renders: int = 4
    optimise_steps: int = 60
    optimise_lr: float = 0.02
    optimise_maps_lr: float = 0.002  # nested/maps_optimised's maps: weights of about 0.1, moved gently
    seed: int = 2000


QUICK = WorthConfig(products=3, timesteps=(800,), noises=1, optimised=1, optimise_renders=2, optimise_steps=2)
OPTIMISED = ("nested", "decoupled")


class Reader:
    """The base, the vision tower and each trained adapter, and the product-region error of one condition."""

    def __init__(self, run_dir: str):
        from na_engine.families.unet import load_base
        from na_engine.formats import load_adapter
        from na_engine.standalone.models import load_vision

        self.base = load_base(os.path.join(run_dir, "base"))
        self.vision = load_vision(os.path.join(run_dir, "encoders", "vision"))
        folder = os.path.join(run_dir, "encoders", "adapters")
        self.adapters = {m: load_adapter(os.path.join(folder, f"{m}.safetensors")).eval() for m in TRAINED}
        for module in [self.base.unet, self.base.vae, *self.base.text_encoders, *self.adapters.values()]:
            module.requires_grad_(False)
        self.latent = int(self.base.unet.config.sample_size)
        self.resolution = self.latent * 2 ** (len(self.base.vae.config.block_out_channels) - 1)
        self._denoiser = None

    def denoiser(self, method: str):
        """The training wrapper of ``method``'s adapter around the base (its processors installed now)."""
        from na_engine.standalone.train import NestedDenoiser

        if self._denoiser is None or self._denoiser[0] != method:
            self._denoiser = (method, NestedDenoiser(self.adapters[method], self.base.unet, "", TRAINED[method].mode))
        return self._denoiser[1]

    def use(self, method: str, adapter) -> None:
        """Read ``method`` with another adapter (a pilot's) from now on."""
        self.adapters[method] = adapter.eval().requires_grad_(False)
        self._denoiser = None

    def tokens(self, method: str, photo) -> torch.Tensor:
        """(M, D) subject tokens of one reference photo."""
        from na_engine.standalone.models import image_features

        with torch.no_grad():
            return self.adapters[method].encode(image_features(self.vision, [photo], "cpu"))[0]

    @torch.no_grad()
    def target(self, scene: world.Scene, times: torch.Tensor, noise: torch.Tensor) -> dict:
        """One render noised at each of ``times`` (B,) with ``noise`` (B, 4, h, w): the model's inputs and masks."""
        from na_engine.families.unet import encode_prompts, trigger_where

        image, mask = world.render(scene, self.resolution)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latents = self.base.vae.encode(pixels).latent_dist.mean * self.base.vae.config.scaling_factor
        latents = latents.expand(len(times), -1, -1, -1)
        schedule = self.base.scheduler
        caption = world.caption(scene)
        context, added = encode_prompts(self.base, [caption] * len(times), self.resolution, "cpu")
        where = trigger_where(self.base, [caption], scene.products[0].identity.kind)  # (1, T)
        m = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
        m = F.interpolate(m, size=latents.shape[-2:], mode="area")[0, 0]  # (h, w): the product's share of each latent
        return {
            "noisy": schedule.add_noise(latents, noise, times),
            "target": schedule.get_velocity(latents, noise, times),
            "times": times,
            "context": context,
            "added": added,
            "where": where.expand(len(times), -1),
            "mask": m,
            "image": image,
            "product_mask": mask,
        }

    def error(
        self, t: dict, method: str | None = None, tokens: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, h, w) squared v-prediction error of the target's rows under one condition: no subject (method None),
        its context at the class word moved by ``offset`` (C,) if given; else ``method``'s adapter with ``tokens``."""
        if method is None:
            context = t["context"] if offset is None else t["context"] + t["where"][..., None] * offset
            pred = self.base.unet(t["noisy"], t["times"], encoder_hidden_states=context).sample
        else:
            b = len(t["times"])
            rows = torch.arange(b)
            pred = self.denoiser(method).predict(
                t["noisy"], t["times"], t["context"], t["added"], tokens.expand(b, *tokens.shape), t["where"], rows
            )
        return (pred.float() - t["target"].float()).pow(2).mean(1)


def regions(err: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean error inside the product's mask (area-weighted) and outside it."""
    e = err.mean(0)
    return {
        "product": float((e * mask).sum() / mask.sum()),
        "elsewhere": float((e * (1 - mask)).sum() / (1 - mask).sum()),
    }


def optimise(error_of, start: torch.Tensor, fits: list, cfg: WorthConfig, maps: list = ()) -> tuple:
    """``start`` fitted to one product by Adam on the product-region error ``error_of(t, x)`` of ``fits`` (other
    renders of it), with ``maps`` (parameters that require grad) if given; returns it and the fits' product
    error before and after (does the fit itself go down?)."""
    x = start.clone().requires_grad_(True)
    groups = [{"params": [x]}] + ([{"params": list(maps), "lr": cfg.optimise_maps_lr}] if maps else [])
    opt = torch.optim.Adam(groups, lr=cfg.optimise_lr)

    def fit_error() -> float:
        with torch.no_grad():
            return float(np.mean([regions(error_of(t, x), t["mask"])["product"] for t in fits]))

    before = fit_error()
    for step in range(cfg.optimise_steps):
        t = fits[step % len(fits)]
        err = error_of(t, x)
        loss = (err * t["mask"]).sum() / (t["mask"].sum() * len(err))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach(), {"fit_before": before, "fit_after": fit_error()}


def with_maps_fitted(reader: Reader, start: torch.Tensor, fits: list, target: dict, cfg: WorthConfig) -> dict:
    """The nested/maps_optimised condition: nested's tokens and per-layer maps fitted on ``fits``, read on
    ``target``; the adapter's maps are put back as they were."""
    adapter = reader.adapters["nested"]
    maps = [layer.weight for layer in (*adapter.to_k, *adapter.to_v)]
    saved = [w.detach().clone() for w in maps]
    try:
        for w in maps:
            w.requires_grad_(True)
        tokens, fitted = optimise(lambda t, x: reader.error(t, "nested", x), start, fits, cfg, maps)
        with torch.no_grad():
            return regions(reader.error(target, "nested", tokens), target["mask"]) | fitted
    finally:
        with torch.no_grad():
            for w, was in zip(maps, saved):
                w.copy_(was)
                w.requires_grad_(False)


def _draws(cfg: WorthConfig, rng, size: int) -> tuple:
    """(B,) timesteps and (B, 4, size, size) noise."""
    times = torch.tensor([t for t in cfg.timesteps for _ in range(cfg.noises)])
    return times, torch.from_numpy(rng.standard_normal((len(times), 4, size, size)).astype(np.float32))


def product_draws(cfg: WorthConfig, name: str, k: int):
    """The generator of the k-th product of set ``name``: a product's draws depend on it alone."""
    return np.random.default_rng([cfg.seed, len(name), k])


def first_draws(reader: Reader, ident, cfg: WorthConfig, rng) -> tuple:
    """A product's first draws, which every condition reads: its target scene, (B,) timesteps, (B, 4, h, w) noise."""
    return world.random_scene(rng, ident), *_draws(cfg, rng, reader.latent)


def described(reader: Reader, scene: world.Scene, times: torch.Tensor, noise: torch.Tensor) -> dict:
    """The text/described condition: the target's noisy latents under the caption that names its look."""
    said = world.told(scene)
    t = reader.target(said, times, noise)
    return {"text/described": regions(reader.error(t), t["mask"]) | {"caption": world.caption(said)}}


def references(reader: Reader, ident, others, rng) -> dict:
    """The product's references, drawn after its target: another scene of it as evaluated and masked, and a
    masked scene of another product of its kind (one of ``others``)."""
    scene = world.random_scene(rng, ident)
    wrong = world.random_scene(rng, others[int(rng.integers(len(others)))])
    return {
        "as_evaluated": evaluate.reference_photo(scene, reader.resolution),
        "masked": diagnose.masked_photo(scene, reader.resolution),
        "wrong": diagnose.masked_photo(wrong, reader.resolution),
    }


def read_product(reader: Reader, ident, others, cfg: WorthConfig, rng, fit: bool) -> dict:
    """Every condition's product and elsewhere error for one product (and ``others``: its kind's other products)."""
    from na_engine.standalone.references import subject_box

    shown, times, noise = first_draws(reader, ident, cfg, rng)
    target = reader.target(shown, times, noise)
    drawn = references(reader, ident, others, rng)
    own = subject_box(target["image"], target["product_mask"], white=True)  # the crop round 1 trained on
    photos = {"as_evaluated": drawn["as_evaluated"], "masked": drawn["masked"], "own": own, "wrong": drawn["wrong"]}
    out = {"none": regions(reader.error(target), target["mask"])} | described(reader, shown, times, noise)
    for method in TRAINED:
        for name, photo in photos.items():
            with torch.no_grad():
                out[f"{method}/{name}"] = regions(
                    reader.error(target, method, reader.tokens(method, photo)), target["mask"]
                )
    if fit:
        fits = [
            reader.target(world.random_scene(rng, ident), *_draws(cfg, rng, reader.latent))
            for _ in range(cfg.optimise_renders)
        ]
        for method in OPTIMISED:
            tokens, fitted = optimise(
                lambda t, x, m=method: reader.error(t, m, x), reader.tokens(method, photos["masked"]), fits, cfg
            )
            with torch.no_grad():
                out[f"{method}/optimised"] = regions(reader.error(target, method, tokens), target["mask"]) | fitted
        out["nested/maps_optimised"] = with_maps_fitted(
            reader, reader.tokens("nested", photos["masked"]), fits, target, cfg
        )
        offset, fitted = optimise(
            lambda t, x: reader.error(t, offset=x), torch.zeros(reader.base.context_dim), fits, cfg
        )
        with torch.no_grad():
            out["text/optimised"] = regions(reader.error(target, offset=offset), target["mask"]) | fitted
    return out


def reference_rows(reader: Reader, idents, cfg: WorthConfig, method: str) -> list[dict]:
    """Per held-out product, none's and ``method``'s product and elsewhere error with each of its references:
    read_product's draws, so the round's own adapter gives worth.json's figures."""
    rows = []
    for k, ident in enumerate(idents[: cfg.products]):
        rng = product_draws(cfg, "heldout", k)
        target = reader.target(*first_draws(reader, ident, cfg, rng))
        others = [i for i in idents if i.kind == ident.kind and i.index != ident.index]
        with torch.no_grad():
            row = {"none": regions(reader.error(target), target["mask"])}
            for name, photo in references(reader, ident, others, rng).items():
                tokens = reader.tokens(method, photo)
                row[f"{method}/{name}"] = regions(reader.error(target, method, tokens), target["mask"])
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per condition: mean product and elsewhere error, and the product error's change against none in percent
    with a 95% interval over products; per method read with both, identity = wrong - masked (points of that
    change)."""
    out = {}
    none = np.array([r["none"]["product"] for r in rows])
    for cond in rows[0]:
        have = [r for r in rows if cond in r]
        prod = np.array([r[cond]["product"] for r in have])
        base = np.array([r["none"]["product"] for r in have])
        change = 100 * (prod - base) / base
        out[cond] = {
            "product": round(float(prod.mean()), 5),
            "elsewhere": round(float(np.mean([r[cond]["elsewhere"] for r in have])), 5),
            "product_change_pct": round(float(change.mean()), 2),
            "product_change_pct_ci95": [round(v, 2) for v in metrics.mean_interval(change)],
            "n": len(have),
        }
        for key in ("fit_before", "fit_after"):  # the optimised conditions' product error on their own fits
            if key in have[0][cond]:
                out[cond][key] = round(float(np.mean([r[cond][key] for r in have])), 5)
    for method in [m for m in TRAINED if f"{m}/wrong" in rows[0]]:
        gap = 100 * np.array([r[f"{method}/wrong"]["product"] - r[f"{method}/masked"]["product"] for r in rows]) / none
        out[f"{method}/identity_pct"] = round(float(gap.mean()), 2)
    return out


def worth(run_dir: str, train, heldout, cfg: WorthConfig, log=print) -> str:
    """Reads every condition on ``cfg.products`` held-out and as many seen products; writes DIR/worth.json."""
    reader = Reader(run_dir)
    folder = os.path.join(run_dir, "worth")
    os.makedirs(folder, exist_ok=True)
    result = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": f"python -m study worth --out {run_dir}",
        "config": asdict(cfg),
    }
    for name, idents in (("heldout", heldout), ("seen", train)):
        cache = os.path.join(folder, f"{name}.json")
        rows = json.load(open(cache)) if os.path.isfile(cache) else []  # a product's rows, cached as read
        for k, ident in enumerate(idents[: cfg.products]):
            draws = product_draws(cfg, name, k)
            if k < len(rows):  # cached: text/described is read again if its words are not today's (or absent)
                shown, times, noise = first_draws(reader, ident, cfg, draws)
                if rows[k].get("text/described", {}).get("caption") == world.caption(world.told(shown)):
                    continue
                rows[k] |= described(reader, shown, times, noise)
            else:
                others = [i for i in idents if i.kind == ident.kind and i.index != ident.index]
                rows.append(read_product(reader, ident, others, cfg, draws, fit=k < cfg.optimised))
            with open(cache, "w") as f:
                json.dump(rows, f)
            log(f"worth: {name} {k + 1}/{min(cfg.products, len(idents))}")
        result[name] = summarise(rows)
    path = os.path.join(run_dir, "worth.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path
