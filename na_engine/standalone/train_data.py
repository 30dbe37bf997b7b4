"""The trainer's data: the training set, the order of its batches and each step's random draws.

Every draw comes from a generator seeded by (seed, stream, step, global row), so a resumed run, or a run
on another number of processes with the same global batch, sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .prepare import DATASET_FILE, item_subjects
from .references import augment, subject_box

if TYPE_CHECKING:
    from .train import TrainConfig


class TrainSet(torch.utils.data.Dataset):
    """Items are addressed by (step, row, index), and each draws its augmentation from a
    generator seeded by them: a resumed run sees exactly the batches it would have."""

    def __init__(
        self,
        folder: str,
        resolution: int,
        processor,
        seed: int,
        other_photo: float = 1.0,
        white: bool = False,
        masks: bool = False,
    ):
        with open(os.path.join(folder, DATASET_FILE)) as f:
            record = json.load(f)
        self.folder, self.items, self.class_word = folder, record["items"], record["class_word"]
        self.subjects = item_subjects(record)  # per item: [{"trigger", "group", "mask"}]
        self.resolution, self.processor, self.seed, self.other_photo = resolution, processor, seed, other_photo
        self.white = white  # another photo's background whitened by its mask too
        self.masks = masks  # items carry their subjects' mask (for --subject-loss-weight)
        self.photos: Dict[str, List[int]] = {}  # group -> the items that show that subject alone
        for index, subjects in enumerate(self.subjects):
            if len(subjects) == 1:
                self.photos.setdefault(subjects[0]["group"], []).append(index)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        step, row, index = key
        rng = random.Random(stream_seed(self.seed, AUGMENT, step, row))
        image = self.image(index)
        target = _to_tensor(image.resize((self.resolution,) * 2)) * 2 - 1  # (3, R, R) in [-1, 1]
        references = [augment(self.reference(index, image, s, rng), rng) for s in self.subjects[index]]
        pixels = self.processor(images=references, return_tensors="pt").pixel_values  # (S, 3, P, P)
        triggers = [s["trigger"] for s in self.subjects[index]]
        item = {"target": target, "references": pixels, "caption": self.caption(index), "triggers": triggers}
        if self.masks:
            item["mask"] = self.subjects_mask(index)
        return item

    def subjects_mask(self, index: int) -> Tensor:
        """(1, R, R) in [0, 1]: the union of the item's subject masks at the training resolution."""
        side = (self.resolution,) * 2
        masks = [np.asarray(self.mask(index, s).resize(side), np.float32) / 255 for s in self.subjects[index]]
        return torch.from_numpy(np.maximum.reduce(masks))[None]

    def reference(self, index: int, image, subject: dict, rng: random.Random):
        """Another photo of the subject, background kept (whitened with ``white``); else the target's own subject
        on white."""
        others = [i for i in self.photos.get(subject["group"], []) if i != index]
        if others and rng.random() < self.other_photo:
            other = others[rng.randrange(len(others))]
            return subject_box(self.image(other), self.mask(other, self.subjects[other][0]), white=self.white)
        return subject_box(image, self.mask(index, subject), white=True)

    def image(self, index: int):
        from PIL import Image

        with Image.open(os.path.join(self.folder, self.items[index] + ".png")) as im:
            return im.convert("RGB")

    def mask(self, index: int, subject: dict):
        from PIL import Image

        path = os.path.join(self.folder, subject["mask"]) if subject.get("mask") else ""
        if not os.path.isfile(path):  # no mask (a record from before grouping names one for every item)
            return None
        with Image.open(path) as im:
            return im.convert("L")

    def caption(self, index: int) -> str:
        with open(os.path.join(self.folder, self.items[index] + ".txt")) as f:
            return f.read().strip()


def _to_tensor(image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


ORDER, DRAWS, AUGMENT = 1, 2, 3  # the random streams: data order, per-row draws, augmentation


def stream_seed(seed: int, stream: int, *index: int) -> int:
    """A seed for one stream at one index (step, row): independent across seeds, streams and indices."""
    return int(np.random.SeedSequence([seed, stream, *index]).generate_state(1)[0])


def step_batches(
    n: int, batch: int, start: int, stop: int, seed: int, rank: int, world: int, fixed: bool
) -> Iterator[List[tuple]]:
    """(step, global row, item) lists for micro-steps start..stop-1.

    Each step draws the global batch (batch x world items) from its own seed and this process
    takes its slice: the data order depends on the global batch only, so one process with batch
    2B sees the rows that two processes with batch B share."""
    for step in range(start, stop):
        key = 0 if fixed else step
        g = torch.Generator().manual_seed(stream_seed(seed, ORDER, key))
        items = torch.randint(n, (batch * world,), generator=g)
        yield [(key, row, int(items[row])) for row in range(rank * batch, (rank + 1) * batch)]


@dataclass
class RowDraws:
    """A micro-step's random draws for this process's rows, each row's from its own seed
    (step, global row): the same whatever the number of processes."""

    drop_caption: Tensor  # (b,) bool
    drop_subject: Tensor  # (b,) bool
    timesteps: Tensor  # (b,) long
    noise: Tensor  # (b, 4, h, w)
    latent_eps: Tensor  # (b, 4, h, w): the VAE posterior's sample

    @classmethod
    def draw(cls, cfg: TrainConfig, micro: int, rows: range, latent: tuple, timesteps: int) -> "RowDraws":
        weights = timestep_weights(cfg, timesteps)
        draws = []
        for row in rows:
            g = torch.Generator().manual_seed(stream_seed(cfg.seed, DRAWS, 0 if cfg.fixed_batch else micro, row))
            u = torch.rand(2, generator=g)
            t = (
                torch.randint(0, timesteps, (1,), generator=g)
                if weights is None
                else weights.multinomial(1, generator=g)
            )
            draws.append(
                (u[0] < cfg.caption_dropout, u[1] < cfg.subject_dropout, t[0], *torch.randn((2, *latent), generator=g))
            )
        return cls(*(torch.stack(column) for column in zip(*draws)))


def timestep_weights(cfg: TrainConfig, timesteps: int) -> Optional[Tensor]:
    """(timesteps,) sampling weights, or None for uniform: --timestep-bias later/earlier makes the noisiest
    (or cleanest) --timestep-bias-portion of the schedule --timestep-bias-multiplier times as likely."""
    if cfg.timestep_bias == "none":
        return None
    weights = torch.ones(timesteps)
    span = max(1, int(round(cfg.timestep_bias_portion * timesteps)))
    part = slice(timesteps - span, timesteps) if cfg.timestep_bias == "later" else slice(0, span)
    weights[part] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def collate(items: Sequence[dict]) -> dict:
    """Rows, and their subjects flattened: references (S, 3, P, P), each subject's row and trigger; the rows'
    subject masks (B, 1, R, R) where the items carry them."""
    masks = {"mask": torch.stack([i["mask"] for i in items])} if "mask" in items[0] else {}
    return masks | {
        "target": torch.stack([i["target"] for i in items]),
        "references": torch.cat([i["references"] for i in items]),
        "subject_rows": torch.tensor([row for row, i in enumerate(items) for _ in i["triggers"]]),
        "caption": [i["caption"] for i in items],
        "triggers": [t for i in items for t in i["triggers"]],
    }
