"""The identity probe: a small CNN trained on renders of train identities only, never on generated images.

An image is read as the product's crop (crop): the pixels that are not the background colour
(study.metrics.foreground), boxed, the rest set to grey, padded to a square and resized to 32 px.
Generated images and references go through the same reading. The probe classifies train identities;
its penultimate features, L2-normalised, are the identity embedding. A held-out identity's gallery
embedding is the normalised mean over renders of it in several random scenes.

Every generated image is decoded by the base's VAE, which blurs the fine label pattern that tells
products apart: round 2's probe, trained with blur and noise only, read the true render through that VAE
at 0.607. So a share of its training renders (vae_share) go through the VAE and back, the rest get blur
and noise. It is fixed, with its held-out accuracy on renders and on their VAE round trips recorded,
before any method is evaluated.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from . import metrics, world

SIDE = 32  # the probe's input side


@dataclass
class ProbeConfig:
    renders_per_identity: int = 24
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    gallery_renders: int = 8
    vae_share: float = 0.5  # of the training renders: encoded and decoded by the base's VAE (the rest softened)
    seed: int = 0


QUICK = ProbeConfig(renders_per_identity=3, steps=10, batch=16, gallery_renders=2)


class Probe(nn.Module):
    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.AvgPool2d(2),  # 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.AvgPool2d(2),  # 8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(), nn.AvgPool2d(2),  # 4
            nn.Flatten(), nn.Linear(4 * w * 16, 128),
        )  # fmt: skip
        self.classify = nn.Linear(128, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] -> (B, 128), unit length."""
        return F.normalize(self.features(x * 2 - 1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x * 2 - 1))


def crop(image: Image.Image, columns: tuple[float, float] = (0.0, 1.0)) -> np.ndarray | None:
    """The product within ``columns`` (fractions of the width) as (3, 32, 32) float in [0, 1]; None if absent."""
    a = np.asarray(image.convert("RGB"), np.float32) / 255
    fg = metrics.foreground(image)
    w = fg.shape[1]
    fg[:, : int(round(columns[0] * w))] = False
    fg[:, int(round(columns[1] * w)) :] = False
    if fg.sum() < 4:
        return None
    ys, xs = np.nonzero(fg)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    part = np.where(fg[..., None], a, 0.5)[top:bottom, left:right]
    side = max(part.shape[:2])
    square = np.full((side, side, 3), 0.5, np.float32)
    y0, x0 = (side - part.shape[0]) // 2, (side - part.shape[1]) // 2
    square[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = part
    small = Image.fromarray((square * 255).round().astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR)
    return np.asarray(small, np.float32).transpose(2, 0, 1) / 255


def _soften(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur of radius 0-1 px and pixel noise: how an image through a small autoencoder differs from a render."""
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.0))))
    a = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 6), (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


@torch.no_grad()
def through_vae(vae, images: list) -> list:
    """Each image encoded (posterior mean) and decoded by ``vae``, as every generated image is decoded."""
    x = torch.stack([torch.from_numpy(np.asarray(i, np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images])
    y = torch.cat([vae.decode(vae.encode(part).latent_dist.mean).sample for part in x.split(64)])  # (n, 3, R, R)
    return [Image.fromarray(a) for a in ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]


def _render_crops(identities, per_identity: int, resolution: int, rng, soften: bool, vae=None, vae_share=0.0):
    """Crops of random renders, labelled by identity; ``soften`` blurs and noises them, except the ``vae_share``
    that go through ``vae`` and back."""
    images, labels = [], []
    for label, ident in enumerate(identities):
        for _ in range(per_identity):
            images.append(world.render(world.random_scene(rng, ident), resolution)[0])
            labels.append(label)
    decoded = rng.random(len(images)) < vae_share if vae is not None else np.zeros(len(images), bool)
    if decoded.any():
        for k, image in zip(np.flatnonzero(decoded), through_vae(vae, [images[k] for k in np.flatnonzero(decoded)])):
            images[k] = image
    xs, ys = [], []
    for image, label, was_decoded in zip(images, labels, decoded):
        c = crop(_soften(image, rng) if soften and not was_decoded else image)
        if c is not None:
            xs.append(c)
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def train_probe(train_ids, resolution: int, cfg: ProbeConfig, log=print, vae=None) -> Probe:
    """The probe, on renders of ``train_ids``: ``cfg.vae_share`` of them through ``vae`` and back."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x, y = _render_crops(train_ids, cfg.renders_per_identity, resolution, rng, True, vae, cfg.vae_share)
    log(f"probe: {len(x)} training crops of {len(train_ids)} identities")
    probe = Probe(len(train_ids))
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch,), generator=g)
        batch = x[idx]
        if step % 2:  # mirror half the batches: a mug's handle may face either way in a generated image
            batch = batch.flip(-1)
        loss = F.cross_entropy(probe(batch), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.steps - 1:
            log(f"probe step {step} loss {loss.item():.3f}")
    return probe.eval()


class Gallery:
    """Held-out identities' mean embeddings; reads identity from a generated image."""

    def __init__(self, probe: Probe, heldout, resolution: int, renders: int, seed: int):
        self.probe, self.indices = probe, [i.index for i in heldout]
        rng = np.random.default_rng(seed + 7)
        x, y = _render_crops(heldout, renders, resolution, rng, soften=False)
        with torch.no_grad():
            e = probe.embed(x)
        self.means = F.normalize(torch.stack([e[y == k].mean(0) for k in range(len(heldout))]), dim=-1)  # (H, 128)

    @torch.no_grad()
    def similarities(self, crop_: np.ndarray | None) -> np.ndarray | None:
        """Cosine similarity of one product crop to every held-out identity, (H,); None without a product."""
        if crop_ is None:
            return None
        return (self.probe.embed(torch.from_numpy(crop_)[None]) @ self.means.T)[0].numpy()

    def position(self, identity_index: int) -> int:
        return self.indices.index(identity_index)


def render_accuracy(gallery: Gallery, heldout, resolution: int, per_identity: int, seed: int, vae=None) -> float:
    """Top-1 of the probe on fresh held-out renders in new scenes (through ``vae`` and back, if given): its
    ceiling, before any generated image."""
    rng = np.random.default_rng(seed + 11)
    scenes = [(ident, world.random_scene(rng, ident)) for ident in heldout for _ in range(per_identity)]
    images = [world.render(scene, resolution)[0] for _, scene in scenes]
    images = through_vae(vae, images) if vae is not None else images
    right = 0
    for (ident, _), image in zip(scenes, images):
        s = gallery.similarities(crop(image))
        right += int(s is not None and int(np.argmax(s)) == gallery.position(ident.index))
    return right / len(scenes)


def save_probe(probe: Probe, folder: str, cfg: ProbeConfig) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, os.path.join(folder, "probe.safetensors"))
    with open(os.path.join(folder, "probe.json"), "w") as f:
        json.dump({"classes": probe.classify.out_features, "config": asdict(cfg)}, f)


def load_probe(folder: str) -> Probe:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "probe.json")) as f:
        classes = json.load(f)["classes"]
    probe = Probe(classes)
    probe.load_state_dict(load_file(os.path.join(folder, "probe.safetensors")))
    return probe.eval()
