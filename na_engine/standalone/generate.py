"""python -m na_engine generate: standalone Nested Attention inference with diffusers pipelines.

One run:   --prompt "a photo of a bottle on a desk" --subject ref1.jpg --trigger bottle --seed 1 2
Base image (no subject, no --adapter needed): --prompt "a photo of a bottle on a desk" --seed 1
Catalogue: --batch jobs.csv, one image a row:
             prompt    the text; it must hold the trigger word
             subject   a reference photo, or a folder of photos of one subject (relative to the CSV's folder);
                       empty, with an empty trigger: the base's own image of the prompt
             trigger   the prompt word the subject binds to ("bottle", "dog", ...)
             seed      a whole number, 0 to 2**63 - 1
             negative  optional: a negative prompt
           --batch jobs.json ({"prompts": [...], "subjects": [{"name", "images", "trigger"}], "seeds": [...]}):
           every combination
           With --batch, --prompt, --subject, --trigger, --seed and --negative are refused: the file says them.
Each image is written to --out with, unless --no-maps, its attention-map panel:
[where the trigger attends | which subject token each pixel draws from | the reference coloured by token].
A rerun skips the rows already rendered with the same job and settings.
--base may be a diffusers FluxPipeline folder, with a Flux adapter (na_engine/families/flux.py): --cfg is then
Flux's guidance, and a negative prompt is refused.
`accelerate launch --multi_gpu --num_processes N -m na_engine generate ...` splits the rows across N
processes (GPUs, or CPU processes where none is visible), each row the same image as one process gives;
manifest.csv lists every row with the process that rendered it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import List, Sequence, Union

import numpy as np
import torch

from ..adapter import NestedAdapter
from ..binding import ModelCall, Placement
from ..capture import AttentionCapture, token_legend
from ..errors import NestedAttentionError, command_line, disk_full
from ..families import folder_family
from ..formats import load_adapter
from ..hosts.diffusers_processor import install
from ..subjects import Subject
from ..tokens import has_word
from . import cli, validate
from .models import Vision, check_match, clip_vision_width, encode_subject, load_vision


@dataclass
class Job:
    prompt: str
    images: List[str]  # reference photo paths of one subject
    trigger: str
    seed: int
    name: str = "subject"
    negative: str = ""


class NestedGenerator:
    """A diffusers pipeline of the base's family whose denoiser runs the engine's nested attention (its processors
    may be a trainer's)."""

    def __init__(self, base, vision: Vision, adapter: NestedAdapter, device):
        self.base, self.vision, self.adapter, self.device = base, vision, adapter, device
        self.family = base.family
        self.processors = install(base.unet, adapter.layers) if adapter is not None else None  # None: base images
        self.pipe = self.family.pipeline(base, device)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(self, images: Sequence, trigger: str, combine: str = "concat", mode: str = "nested") -> Subject:
        """PIL photos of one subject -> the subject (models.encode_subject)."""
        self.family.refuse_mode(mode)
        return encode_subject(self.adapter, self.vision, self.device, images, trigger, combine, mode)

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

        family, pipe = self.family, self.pipe
        family.check_call(negative, size, pipe)
        subjects = [subject] if isinstance(subject, Subject) else list(subject)
        placements = [
            Placement(s, family.trigger_mask(self.base, pipe, prompt, s.trigger, cfg), strength, trigger_weight)
            for s in subjects
        ]
        legends = [
            None if s.token_attention is None else token_legend(s.token_attention, s.reference) for s in subjects
        ]
        capture = self.capture = AttentionCapture(legends) if maps else None  # kept: its sums, for measurements
        call = ModelCall(placements, family.latent_grid(pipe, size), capture, family.rows(cfg))
        with self.processors.bound(call) if self.processors is not None else contextlib.nullcontext():
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = family.sample(pipe, prompt, negative, steps, cfg, size, generator)
        image = family.decode(self.base, latents, size)
        panel = None
        if maps:
            pixels = torch.from_numpy(np.array(image)).float()[None] / 255  # (1, H, W, 3)
            panel = Image.fromarray((capture.render(pixels)[0].numpy() * 255).round().astype("uint8"))
        return image, panel


# -- jobs -----------------------------------------------------------------------------------


CSV_COLUMNS = ("prompt", "subject", "trigger", "seed")


def read_jobs(path: str) -> List[Job]:
    """A CSV of explicit rows, or a JSON of prompts x subjects x seeds; every bad row is reported at once."""
    if not os.path.isfile(path):
        raise NestedAttentionError(f"Batch file not found: {path}")
    if path.lower().endswith(".csv"):
        return _csv_jobs(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise NestedAttentionError(f"{path} is not valid JSON ({e}); see --help for the catalogue format.") from None
    return _json_jobs(path, spec)


def _csv_jobs(path: str) -> List[Job]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise NestedAttentionError(
            f"{path}: the header {header or '(empty)'} lacks {', '.join(missing)}; a catalogue's columns are "
            f"{', '.join(CSV_COLUMNS)} and optionally negative (see --help)."
        )
    if not rows:
        raise NestedAttentionError(f"{path} has a header but no rows.")
    jobs, faults = [], []
    for number, r in enumerate(rows, start=2):  # line 1 is the header
        if None in r or any(r[c] is None for c in header):
            faults.append(f"line {number}: {len(header)} columns expected, the row has another number")
            continue
        problems = []
        if not r["prompt"].strip():
            problems.append("prompt is empty")
        try:
            seed = cli.seed(r["seed"].strip())
        except Exception as e:
            problems.append(f"seed {r['seed']!r}: {e}")
        images, subject, trigger = [], r["subject"].strip(), r["trigger"].strip()
        if subject:
            try:
                images = cli.photo_files(_rel(base, subject))
            except NestedAttentionError as e:
                problems.append(f"subject: {e}")
        if trigger and r["prompt"] and not has_word(r["prompt"], trigger):
            problems.append(f"the trigger {r['trigger']!r} is not in the prompt")
        if bool(subject) != bool(trigger):
            problems.append("give both subject and trigger, or neither (a base image)")
        if problems:
            faults.append(f"line {number}: " + "; ".join(problems))
            continue
        name = os.path.splitext(os.path.basename(subject.rstrip("/\\")))[0] if subject else "base"
        jobs.append(Job(r["prompt"], images, trigger, seed, name, r.get("negative") or ""))
    if faults:
        raise NestedAttentionError(f"{path}: {len(faults)} bad rows, nothing rendered:\n  " + "\n  ".join(faults))
    return jobs


def _json_jobs(path: str, spec) -> List[Job]:
    validate.catalogue(path, spec)
    base = os.path.dirname(os.path.abspath(path))
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
        seeds = [cli.seed(str(s)) for s in spec.get("seeds", [0])]
        return [
            Job(p, imgs, trig, seed, name, spec.get("negative", ""))
            for name, imgs, trig in subjects
            for p in spec["prompts"]
            for seed in seeds
        ]
    except (KeyError, TypeError, AttributeError, argparse.ArgumentTypeError) as e:
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
    and CLIP vision paths) and the adapter's weights.  Each finished row is appended to manifest.csv at
    once, so an interrupted or failed catalogue resumes from its last finished row, and a changed row is
    rendered again.  A row that fails is reported and the others go on.  Images are written under a
    temporary name and renamed; files the catalogue did not write are never replaced or deleted."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    os.makedirs(out, exist_ok=True)
    fingerprint = generator.adapter.fingerprint() if generator.adapter is not None else ""
    settings = [steps, cfg, size, strength, maps, trigger_weight, mode, models, fingerprint]
    keys = [_row_key(job, settings) for job in jobs]
    stems = [os.path.join(out, f"{i:04d}_{_safe(job.name)}_{job.seed}") for i, job in enumerate(jobs)]
    before = _read_manifest(out)
    _refuse_foreign(stems, before, out)
    if state.is_main_process:  # what a killed run of this catalogue left half-written (only its own names)
        for stem in stems:
            for partial in (stem + ".png.partial", stem + ".maps.png.partial"):
                if os.path.isfile(partial):
                    os.remove(partial)
        _start_manifest(out)
    state.wait_for_everyone()

    def done(i: int) -> bool:  # its image exists, recorded under the same key
        file = os.path.basename(stems[i]) + ".png"
        return os.path.isfile(stems[i] + ".png") and before.get(file, {}).get("key") == keys[i]

    mine = [i for i in range(rank, len(jobs), world) if not done(i)]
    cache, failed = {}, []
    for i in tqdm(mine, desc=f"catalogue (process {rank} of {world})", disable=not state.is_main_process):
        job = jobs[i]
        try:
            key = (tuple(job.images), job.trigger)
            if key not in cache:
                cache[key] = (
                    [generator.encode([_open(p) for p in job.images], job.trigger, mode=mode)] if job.images else []
                )
            image, panel = generator(
                job.prompt, cache[key], job.seed, steps, cfg, size, job.negative, strength,
                maps and bool(job.images), trigger_weight,
            )  # fmt: skip
            files = [(image, stems[i] + ".png")] + ([(panel, stems[i] + ".maps.png")] if panel is not None else [])
            for picture, path in files:
                picture.save(path + ".partial", format="PNG")
        except (NestedAttentionError, RuntimeError, OSError, ValueError) as e:
            if disk_full(e):
                raise  # a full disk fails every row alike: stop at once (errors.command_line says so)
            failed.append((i, f"{type(e).__name__}: {e}"))
            print(f"row {i + 1} ({os.path.basename(stems[i])}) failed, the others go on: {e}", file=sys.stderr)
            continue
        # recorded before its files take their names: every image under a row's name is one the manifest lists;
        # an older image of the row goes first, so none is ever recorded under the new key
        for _, path in files:
            if os.path.isfile(path):
                os.remove(path)
        _append_manifest(out, _manifest_row(job, stems[i], keys[i], rank))
        for _, path in files:
            os.replace(path + ".partial", path)
    failed = sorted(f for part in gather_object([failed]) for f in part)
    attempted = sum(gather_object([len(mine)]))
    if state.is_main_process:
        _write_manifest(out, stems)  # one row per finished file, in the catalogue's order
        print(f"rendered {attempted - len(failed)} rows, kept {len(jobs) - attempted} from an earlier run")
    state.wait_for_everyone()
    if failed:
        raise NestedAttentionError(
            f"{len(failed)} of {len(jobs)} rows failed (the rest are in {out}; run again to retry them):\n  "
            + "\n  ".join(f"row {i + 1}: {why}" for i, why in failed)
        )
    return [stem + ".png" for stem in stems]


def _row_key(job: Job, settings: list) -> str:
    """What a row's image depends on, hashed."""
    return hashlib.sha256(json.dumps([asdict(job), settings], sort_keys=True).encode()).hexdigest()[:16]


MANIFEST_COLUMNS = ["file", "prompt", "subject", "trigger", "seed", "rank", "key"]


def _safe(name: str) -> str:
    """A subject name usable in a file name (a '/' or other separator would make a folder)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "subject"


def _read_manifest(out: str) -> dict:
    """file -> its last recorded row (a row appended later supersedes an earlier one)."""
    path = os.path.join(out, "manifest.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f) if r.get("file") and r.get("key")}


def _refuse_foreign(stems: List[str], before: dict, out: str) -> None:
    """A row's image name taken by a file the manifest does not list is a file this catalogue did not write."""
    foreign = [
        os.path.basename(s) + ext
        for s in stems
        for ext in (".png", ".maps.png")
        if os.path.isfile(s + ext) and os.path.basename(s) + ".png" not in before
    ]
    if foreign:
        raise NestedAttentionError(
            f"{out} holds {len(foreign)} files with this catalogue's names that it did not write (e.g. {foreign[0]}); "
            "they would be replaced. Use another --out, or move them."
        )


def _manifest_row(job: Job, stem: str, key: str, rank) -> list:
    return [os.path.basename(stem) + ".png", job.prompt, job.name, job.trigger, job.seed, rank, key]


def _start_manifest(out: str) -> None:
    path = os.path.join(out, "manifest.csv")
    if not os.path.isfile(path):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(MANIFEST_COLUMNS)


def _append_manifest(out: str, row: list) -> None:
    """One finished row, in one write of one line (appends of a line are not interleaved across processes)."""
    import io

    line = io.StringIO()
    csv.writer(line).writerow(row)
    with open(os.path.join(out, "manifest.csv"), "a", newline="") as f:
        f.write(line.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(out: str, stems: List[str]) -> None:
    """manifest.csv rewritten with one row per file of the catalogue, in its order (atomically): a row's last
    record, whatever its key (an image of older settings is still the catalogue's, and is rendered again)."""
    path = os.path.join(out, "manifest.csv")
    recorded = _read_manifest(out)
    with open(path + ".partial", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for stem in stems:
            row = recorded.get(os.path.basename(stem) + ".png")
            if row is not None and os.path.isfile(stem + ".png"):  # another key too: still this catalogue's file
                w.writerow([row[c] for c in MANIFEST_COLUMNS])
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
    p = cli.parser("generate", __doc__, epilog=__doc__.split("\n", 1)[1])
    cli.add_model_arguments(p)
    p.add_argument(
        "--adapter",
        help="Nested Attention adapter (.safetensors) or IP-Adapter Plus checkpoint; not needed for base images",
    )
    p.add_argument("--subject", nargs="*", help="reference photo(s) or a folder of them")
    p.add_argument("--trigger", help="the prompt word the subject binds to")
    p.add_argument("--prompt", nargs="*")
    p.add_argument("--seed", type=cli.seed, nargs="*", help="default 0")
    p.add_argument("--negative")
    p.add_argument("--batch", help="a catalogue, CSV or JSON (its format above)")
    p.add_argument("--steps", type=cli.at_least(1), default=30)
    p.add_argument("--cfg", type=cli.at_least(0.0, float), default=7.0)
    p.add_argument(
        "--size",
        type=cli.at_least(8),
        default=None,
        help="image side, a multiple of 8; default: the resolution the base records (its na_engine.json), else 512 "
        "for SD1.5 and 1024 for SDXL",
    )
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
    check_arguments(args)
    from accelerate import PartialState

    written = generate(args)
    if PartialState().is_main_process:
        print(f"{len(written)} images in {args.out}, listed in manifest.csv")
    return 0


def check_arguments(args) -> None:
    """The options' combinations and the output folder, before anything loads."""
    single = {"--prompt": args.prompt, "--subject": args.subject, "--trigger": args.trigger, "--seed": args.seed}
    single["--negative"] = args.negative
    if args.batch:
        given = [flag for flag, value in single.items() if value is not None]
        if given:
            raise NestedAttentionError(
                f"--batch takes every row's prompt, subject, trigger and seed from its file; {', '.join(given)} "
                "would be ignored. Drop them, or put them in the catalogue."
            )
    validate.generate_options(args)
    if args.size is not None and args.size % 8:
        raise NestedAttentionError(f"--size must be a multiple of 8 (the VAE's factor), not {args.size}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NestedAttentionError(f"--out {args.out} is a file; give a folder for the images.")
    cli.check_writable(f"--out {args.out}", args.out)


def generate(args) -> List[str]:
    jobs = read_jobs(args.batch) if args.batch else _jobs_from_args(args)
    validate.subjectless(args, jobs)
    if not args.adapter and any(job.images for job in jobs):
        raise NestedAttentionError("Rows with a subject need --adapter (only base images, without a subject, do not).")
    for job in jobs:  # the tokenizer checks again, exactly, once it is loaded
        if job.images and not has_word(job.prompt, job.trigger):
            raise NestedAttentionError(
                f"The trigger word {job.trigger!r} is not in the prompt {job.prompt!r}. Write it where the subject "
                "should appear."
            )
    adapter = load_adapter(args.adapter) if args.adapter else None
    family = folder_family(args.base, args.base_config)
    layers = family.folder_layers(args.base, args.base_config)
    check_match(layers, clip_vision_width(args.clip_vision), adapter, args.base, args.clip_vision)
    from accelerate import PartialState

    cli.check_launch()
    device = PartialState(cpu=not torch.cuda.is_available()).device  # this process's device under accelerate launch
    dtype = cli.DTYPES.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    vision = load_vision(args.clip_vision, dtype)
    vision.model.to(device)
    adapter = adapter.to(device) if adapter is not None else None
    generator = NestedGenerator(family.load(args.base, args.base_config, dtype), vision, adapter, device)
    size = args.size or cli.base_record(args.base, args.base_config).get("resolution") or family.default_size
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
    if not args.prompt or bool(args.subject) != bool(args.trigger):
        raise NestedAttentionError(
            "Give --prompt with --subject and --trigger (or neither, for the base's own images), or a --batch file."
        )
    if not args.subject:
        return [Job(p, [], "", seed, "base", args.negative or "") for p in args.prompt for seed in args.seed or [0]]
    images = [f for s in args.subject for f in cli.photo_files(s)]
    name = os.path.splitext(os.path.basename(args.subject[0].rstrip("/")))[0]
    seeds = args.seed if args.seed else [0]
    return [Job(p, images, args.trigger, seed, name, args.negative or "") for p in args.prompt for seed in seeds]
