"""python -m na_engine generate: standalone Nested Attention inference with diffusers pipelines.

One run:   --prompt "a photo of a bottle on a desk" --subject ref1.jpg --trigger bottle --seed 1 2
Catalogue: --batch jobs.csv (columns prompt, subject, trigger, seed; subject = image or folder of images)
           --batch jobs.json ({"prompts": [...], "subjects": [{"name", "images", "trigger"}], "seeds": [...]}):
           every combination
Each image is written to --out with, unless --no-maps, its attention-map panel:
[where the trigger attends | which subject token each pixel draws from | the reference coloured by token].
A rerun skips the rows already rendered with the same job and settings.
`accelerate launch --multi_gpu --num_processes N -m na_engine generate ...` splits the rows across N
processes (GPUs, or CPU processes where none is visible), each row the same image as one process gives;
manifest.csv lists every row with the process that rendered it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import List, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..adapter import NestedAdapter
from ..binding import ModelCall, Placement
from ..capture import AttentionCapture, token_legend
from ..errors import NestedAttentionError, command_line
from ..hosts.diffusers_processor import install
from ..subjects import Subject
from ..tokens import has_word
from . import cli
from .models import Base, Vision, image_features, trigger_where


@dataclass
class Job:
    prompt: str
    images: List[str]  # reference photo paths of one subject
    trigger: str
    seed: int
    name: str = "subject"
    negative: str = ""


class NestedGenerator:
    """A diffusers pipeline whose UNet runs the engine's nested attention (its processors may be a trainer's)."""

    def __init__(self, base: Base, vision: Vision, adapter: NestedAdapter, device):
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        self.base, self.vision, self.adapter, self.device = base, vision, adapter, device
        self.processors = install(base.unet, adapter.layers)
        scheduler = DDIMScheduler.from_config(base.scheduler.config)
        te, tok = base.text_encoders, base.tokenizers
        if base.is_xl:
            self.pipe = StableDiffusionXLPipeline(base.vae, te[0], te[1], tok[0], tok[1], base.unet, scheduler)
        else:
            self.pipe = StableDiffusionPipeline(
                base.vae, te[0], tok[0], base.unet, scheduler, None, None, requires_safety_checker=False
            )
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(self, images: Sequence, trigger: str, combine: str = "concat", mode: str = "nested") -> Subject:
        """PIL photos of one subject -> the subject, as the ComfyUI encode node makes it.

        ``mode`` "decoupled" makes it act as IP-Adapter does (added image attention) instead of nested."""
        tokens, weights = self.adapter.encode(image_features(self.vision, images, self.device), combine)
        reference = (
            torch.from_numpy(np.array(images[0].convert("RGB").resize((256, 256)))).float() / 255
        )  # (256, 256, 3)
        attention = weights.float().cpu() if len(images) == 1 else None  # the maps' legend colours one photo
        return Subject(tokens, self.adapter, trigger, token_attention=attention, reference=reference, mode=mode)

    @torch.no_grad()
    def decode(self, latents: Tensor):
        """Latents -> PIL image, in the VAE's own dtype (the trainer keeps it in fp32 under mixed precision)."""
        from PIL import Image

        vae = self.base.vae
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample[0]  # (3, size, size) in [-1, 1]
        return Image.fromarray(
            ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subject: Union[Subject, Sequence[Subject]],
        seed: int,
        steps: int = 30,
        cfg: float = 7.0,
        size: int = 512,
        negative: str = "",
        strength: float = 1.0,
        maps: bool = True,
        trigger_weight: float = 1.0,
    ):
        """-> (image, maps panel or None), PIL images.  Several subjects need their own trigger words in the prompt."""
        from PIL import Image

        subjects = [subject] if isinstance(subject, Subject) else list(subject)
        placements = []
        for s in subjects:
            where = trigger_where(self.base, [prompt], s.trigger)  # (1, T)
            if cfg > 1:  # the pipelines batch [negative, positive]; only the positive row binds
                where = torch.cat([torch.zeros_like(where), where])
            placements.append(Placement(s, where, strength, trigger_weight))
        legends = [
            None if s.token_attention is None else token_legend(s.token_attention, s.reference) for s in subjects
        ]
        capture = self.capture = AttentionCapture(legends) if maps else None  # kept: its sums, for measurements
        call = ModelCall(placements, (size // self.pipe.vae_scale_factor,) * 2, capture, 2 if cfg > 1 else 1)
        with self.processors.bound(call):
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = self.pipe(
                prompt,
                negative_prompt=negative,
                num_inference_steps=steps,
                guidance_scale=cfg,
                height=size,
                width=size,
                generator=generator,
                output_type="latent",
            ).images  # (1, 4, h, w)
        image = self.decode(latents)
        panel = None
        if maps:
            pixels = torch.from_numpy(np.array(image)).float()[None] / 255  # (1, H, W, 3)
            panel = Image.fromarray((capture.render(pixels)[0].numpy() * 255).round().astype("uint8"))
        return image, panel


# -- jobs -----------------------------------------------------------------------------------


def read_jobs(path: str) -> List[Job]:
    """A CSV of explicit rows, or a JSON of prompts x subjects x seeds."""
    if not os.path.isfile(path):
        raise NestedAttentionError(f"Batch file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"prompt", "subject", "trigger"} - set(rows[0] if rows else {})
        if not rows or missing:
            raise NestedAttentionError(
                f"{os.path.basename(path)} needs a header with prompt, subject, trigger (and optionally seed, "
                f"negative); missing: {', '.join(sorted(missing)) or 'rows'}."
            )
        return [
            Job(
                r["prompt"],
                cli.photo_files(_rel(base, r["subject"])),
                r["trigger"],
                int(r.get("seed") or 0),
                os.path.splitext(os.path.basename(r["subject"].rstrip("/")))[0],
                r.get("negative") or "",
            )
            for r in rows
        ]
    with open(path) as f:
        spec = json.load(f)
    try:
        subjects = [
            (
                s["name"],
                cli.photo_files(_rel(base, s["images"]))
                if isinstance(s["images"], str)
                else [_rel(base, p) for p in s["images"]],
                s["trigger"],
            )
            for s in spec["subjects"]
        ]
        return [
            Job(p, imgs, trig, int(seed), name, spec.get("negative", ""))
            for name, imgs, trig in subjects
            for p in spec["prompts"]
            for seed in spec.get("seeds", [0])
        ]
    except (KeyError, TypeError) as e:
        raise NestedAttentionError(
            f"{os.path.basename(path)} must be "
            f'{{"prompts": [...], "subjects": [{{"name", "images", "trigger"}}], "seeds": [...]}}; '
            f"{e!r} is missing or wrong."
        ) from e


def _rel(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def run_jobs(
    generator: NestedGenerator,
    jobs: Sequence[Job],
    out: str,
    steps: int,
    cfg: float,
    size: int,
    strength: float,
    maps: bool,
    trigger_weight: float = 1.0,
    mode: str = "nested",
    models: str = "",
) -> List[str]:
    """Render the catalogue; returns every row's image path.

    Under ``accelerate launch`` row i belongs to process i mod N.  A row is skipped when its image
    exists and manifest.csv records it with the same key: its job, these settings, ``models`` (the base
    and CLIP vision paths) and the adapter's weights.  So an interrupted catalogue resumes, and a changed
    row is rendered again.  Images are written under a temporary name and renamed; the main process
    then writes manifest.csv with every row once."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    os.makedirs(out, exist_ok=True)
    if state.is_main_process:  # images a killed run left half-written
        for name in os.listdir(out):
            if name.endswith(".partial"):
                os.remove(os.path.join(out, name))
    state.wait_for_everyone()
    settings = [steps, cfg, size, strength, maps, trigger_weight, mode, models, generator.adapter.fingerprint()]
    keys = [_row_key(job, settings) for job in jobs]
    stems = [os.path.join(out, f"{i:04d}_{job.name}_{job.seed}") for i, job in enumerate(jobs)]
    before = _read_manifest(out)

    def done(i: int) -> bool:  # its image exists, recorded under the same key
        file = os.path.basename(stems[i]) + ".png"
        return os.path.isfile(stems[i] + ".png") and before.get(file, {}).get("key") == keys[i]

    mine = [i for i in range(rank, len(jobs), world) if not done(i)]
    cache = {}
    for i in tqdm(mine, desc=f"catalogue (process {rank} of {world})", disable=not state.is_main_process):
        job = jobs[i]
        key = (tuple(job.images), job.trigger)
        if key not in cache:
            cache[key] = generator.encode([_open(p) for p in job.images], job.trigger, mode=mode)
        image, panel = generator(
            job.prompt, cache[key], job.seed, steps, cfg, size, job.negative, strength, maps, trigger_weight
        )
        if panel is not None:
            _save(panel, stems[i] + ".maps.png")
        _save(image, stems[i] + ".png")
    rendered = dict(gather_object([(i, rank) for i in mine]))
    if state.is_main_process:
        _write_manifest(out, jobs, stems, keys, rendered, before)
        print(f"rendered {len(rendered)} rows, kept {len(jobs) - len(rendered)} from an earlier run")
    state.wait_for_everyone()
    return [stem + ".png" for stem in stems]


def _row_key(job: Job, settings: list) -> str:
    """What a row's image depends on, hashed."""
    return hashlib.sha256(json.dumps([asdict(job), settings], sort_keys=True).encode()).hexdigest()[:16]


def _save(image, path: str) -> None:
    partial = path + ".partial"
    image.save(partial, format="PNG")
    os.replace(partial, path)


def _read_manifest(out: str) -> dict:
    path = os.path.join(out, "manifest.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def _write_manifest(out: str, jobs: Sequence[Job], stems: List[str], keys: List[str], rendered: dict, before: dict):
    """manifest.csv: every row once, with the process that rendered it (this run, or as recorded before)."""
    path = os.path.join(out, "manifest.csv")
    with open(path + ".partial", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt", "subject", "trigger", "seed", "rank", "key"])
        for i, (job, stem, key) in enumerate(zip(jobs, stems, keys)):
            file = os.path.basename(stem) + ".png"
            rank = rendered[i] if i in rendered else before[file]["rank"]
            w.writerow([file, job.prompt, job.name, job.trigger, job.seed, rank, key])
    os.replace(path + ".partial", path)


def _open(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise NestedAttentionError(f"Could not read subject image {path}: {e}") from e


@command_line
def main(argv=None) -> int:
    p = cli.parser("generate", __doc__)
    cli.add_model_arguments(p)
    p.add_argument(
        "--adapter", required=True, help="Nested Attention adapter (.safetensors) or IP-Adapter Plus checkpoint"
    )
    p.add_argument("--subject", nargs="*", default=[], help="reference photo(s) or a folder of them")
    p.add_argument("--trigger", help="the prompt word the subject binds to")
    p.add_argument("--prompt", nargs="*", default=[])
    p.add_argument("--seed", type=int, nargs="*", default=[0])
    p.add_argument("--negative", default="")
    p.add_argument("--batch", help="CSV or JSON of prompts x subjects (see the module doc)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--size", type=int, default=None, help="image side; default 512 for SD1.5, 1024 for SDXL")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument(
        "--trigger-weight",
        type=float,
        default=1.0,
        help="multiplies the attention the trigger word receives; 1 = the paper's formula",
    )
    p.add_argument(
        "--mode",
        default="nested",
        choices=("nested", "decoupled"),
        help="decoupled: the adapter acts as IP-Adapter does (added image attention), for comparisons",
    )
    p.add_argument("--dtype", default="auto", choices=("auto", *cli.DTYPES), help="auto: fp16 on CUDA, else fp32")
    p.add_argument("--no-maps", action="store_true", help="skip the attention-map panels")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    from accelerate import PartialState

    written = generate(args)
    if PartialState().is_main_process:
        print(f"{len(written)} images in {args.out}, listed in manifest.csv")
    return 0


def generate(args) -> List[str]:
    from ..formats import load_adapter
    from .models import check_match, clip_vision_width, load_base, load_vision, unet_config

    jobs = read_jobs(args.batch) if args.batch else _jobs_from_args(args)
    for job in jobs:  # the tokenizer checks again, exactly, once it is loaded
        if not has_word(job.prompt, job.trigger):
            raise NestedAttentionError(
                f"The trigger word {job.trigger!r} is not in the prompt {job.prompt!r}. Write it where the subject "
                "should appear."
            )
    adapter = load_adapter(args.adapter)
    check_match(
        unet_config(args.base, args.base_config),
        clip_vision_width(args.clip_vision),
        adapter,
        args.base,
        args.clip_vision,
    )
    from accelerate import PartialState

    cli.check_launch()
    device = PartialState(cpu=not torch.cuda.is_available()).device  # this process's device under accelerate launch
    dtype = cli.DTYPES.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    base, vision = load_base(args.base, args.base_config, dtype), load_vision(args.clip_vision, dtype)
    vision.model.to(device)
    generator = NestedGenerator(base, vision, adapter.to(device), device)
    size = args.size or (1024 if base.is_xl else 512)
    return run_jobs(
        generator,
        jobs,
        args.out,
        args.steps,
        args.cfg,
        size,
        args.strength,
        not args.no_maps,
        args.trigger_weight,
        args.mode,
        json.dumps([os.path.abspath(args.base), args.base_config, os.path.abspath(args.clip_vision), str(dtype)]),
    )


def _jobs_from_args(args) -> List[Job]:
    if not args.prompt or not args.subject or not args.trigger:
        raise NestedAttentionError("Give --prompt, --subject and --trigger, or a --batch file.")
    images = [f for s in args.subject for f in cli.photo_files(s)]
    name = os.path.splitext(os.path.basename(args.subject[0].rstrip("/")))[0]
    return [Job(p, images, args.trigger, seed, name, args.negative) for p in args.prompt for seed in args.seed]
