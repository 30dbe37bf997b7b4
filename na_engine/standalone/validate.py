"""The validation pass of train and generate, before any model loads.

Every number an option takes is checked against its command's table here (TRAIN for TrainConfig's fields, GENERATE
for generate's options): finite and in range. ``numbers`` reads the options themselves, so a numeric option that
the table lacks is a KeyError on every run (and tests/training/test_validate.py names it): a new option cannot
skip the check. An option changed from its default that another one makes useless is refused (NEEDS), a base
folder is checked for every part its pipeline loads, and a JSON catalogue for the type of every field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..errors import NestedAttentionError


@dataclass(frozen=True)
class Range:
    """Finite, at least ``low`` (above it where ``above``) and at most ``high``."""

    low: float
    high: float = math.inf
    above: bool = False

    def admits(self, value) -> bool:
        return math.isfinite(value) and (value > self.low if self.above else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        high = "any" if self.high == math.inf else f"{self.high:g}"
        return f"{'above ' if self.above else ''}{self.low:g} to {high}"


TRAIN = {  # every int and float field of TrainConfig
    "steps": Range(1),
    "batch_size": Range(1),
    "grad_accum": Range(1),
    "lr": Range(0, 1, above=True),
    "warmup": Range(0),
    "resolution": Range(8),
    "tokens": Range(1),
    "resampler_depth": Range(1),
    "caption_dropout": Range(0, 1),
    "subject_dropout": Range(0, 1),
    "ema": Range(0, 0.999999),
    "timestep_bias_multiplier": Range(0, 1000, above=True),
    "timestep_bias_portion": Range(0, 1, above=True),
    "other_photo": Range(0, 1),
    "subject_loss_weight": Range(1, 1000),
    "checkpoint_every": Range(1),
    "validate_every": Range(0),
    "validation_steps": Range(1),
    "seed": Range(0, 2**63 - 1),
    "workers": Range(0),
    "trigger_weight": Range(0, 10, above=True),  # the Apply node's range
}

GENERATE = {  # every numeric option of generate
    "steps": Range(1),
    "cfg": Range(0, 100),
    "size": Range(8),
    "strength": Range(0, 3),  # the Apply node's range
    "trigger_weight": Range(0, 10),
}

TRAIN_CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "lr_schedule": ("cosine", "constant"),
    "latents": ("auto", "mean", "sample"),
    "timestep_bias": ("none", "later", "earlier"),
    "mode": ("nested", "decoupled"),
}


FLAGS = {"validation_prompts": "--validation-prompt"}  # a field whose option is not named after it


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def numbers(values: Dict[str, object], table: Dict[str, Range]) -> None:
    """Every int or float among ``values`` (option -> value) finite and in its range; all faults in one message."""
    faults = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name not in table:
            raise KeyError(f"{flag(name)} is a number without a range in na_engine/standalone/validate.py")
        if not table[name].admits(value):
            faults.append(f"{flag(name)} {value} (expected {table[name]})")
    if faults:
        raise NestedAttentionError("Out of range: " + "; ".join(faults) + ".")


def _has_masks(cfg, record: dict) -> bool:
    from .prepare import item_subjects

    subjects = [s for item in item_subjects(record) for s in item]
    return any(s.get("mask") and os.path.isfile(os.path.join(cfg.data, s["mask"])) for s in subjects)


NEEDS: Dict[str, tuple] = {  # option -> (what makes it do something, whether this run has it (cfg, record))
    "timestep_bias_multiplier": ("--timestep-bias later or earlier", lambda cfg, record: cfg.timestep_bias != "none"),
    "timestep_bias_portion": ("--timestep-bias later or earlier", lambda cfg, record: cfg.timestep_bias != "none"),
    "white_references": ("subject masks in the prepared set (prepare --masks)", _has_masks),
    "validation_prompts": ("--validate-every N", lambda cfg, record: cfg.validate_every > 0),
    "validation_steps": ("--validate-every N", lambda cfg, record: cfg.validate_every > 0),
}


def train_options(cfg) -> None:
    """TrainConfig's numbers and choices (the parser checks them too; a config built in Python is checked here)."""
    numbers({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, TRAIN)
    for name, choices in TRAIN_CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise NestedAttentionError(f"{flag(name)} must be one of {', '.join(choices)}, not {getattr(cfg, name)!r}.")


def train_data(cfg, record: dict) -> None:
    """What depends on the prepared set: options it makes useless, the resolution, the validation prompts."""
    from ..tokens import has_word
    from .prepare import item_subjects

    defaults = {f.name: _default(f) for f in dataclasses.fields(cfg)}
    for name, (needed, present) in NEEDS.items():
        if getattr(cfg, name) != defaults[name] and not present(cfg, record):
            raise NestedAttentionError(
                f"{flag(name)} does nothing without {needed}; add that, or leave {flag(name)} out."
            )
    resolution = record.get("resolution") if cfg.resolution is None else cfg.resolution
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        where = "--resolution" if cfg.resolution is not None else f"{cfg.data}/dataset.json's resolution"
        raise NestedAttentionError(f"{where} is {resolution!r}; expected a multiple of 8 (the VAE's factor).")
    trigger = item_subjects(record)[0][0]["trigger"]
    for prompt in cfg.validation_prompts:
        if not has_word(prompt, trigger):
            raise NestedAttentionError(
                f"--validation-prompt {prompt!r} lacks the class word {trigger!r}: the validation images bind the "
                "first training subject to it. Write the word where the subject should appear."
            )


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def generate_options(args) -> None:
    numbers(vars(args), GENERATE)
    base_folder(args.base, args.base_config)
    clip_vision(args.clip_vision)


def clip_vision(path: str) -> None:
    """A CLIP vision folder holds its weights as .safetensors; a file is one (models.clip_vision_width reads the
    rest)."""
    if os.path.isdir(path):
        if not any(n.endswith(WEIGHTS) for n in os.listdir(path)):
            raise NestedAttentionError(
                f"--clip-vision {path} holds no .safetensors weights (a .bin would be a pickle, which is never "
                "loaded). Use the model's .safetensors release."
            )
    elif os.path.isfile(path) and not path.endswith(".safetensors"):
        raise NestedAttentionError(f"--clip-vision {path} must be a .safetensors file or a transformers folder.")


def subjectless(args, jobs) -> None:
    """Options that only act on a subject, given to a run of base images only."""
    if any(job.images for job in jobs):
        return
    plain = {"strength": 1.0, "trigger_weight": 1.0, "mode": "nested"}
    changed = [f"{flag(n)} {getattr(args, n)}" for n, value in plain.items() if getattr(args, n) != value]
    if changed:
        raise NestedAttentionError(
            f"{', '.join(changed)} act on a subject, and no row has one (base images only); leave them out."
        )


# -- base folders --------------------------------------------------------------------------------

WEIGHTS = (".safetensors", ".safetensors.index.json")  # never .bin, .ckpt or .pt: those are pickles


def _parts(folder: str, flux: bool, xl: bool) -> List[tuple]:
    """(part, whether it is there) for every part the folder's pipeline loads."""

    def weights(sub: str) -> bool:
        path = os.path.join(folder, sub)
        return os.path.isdir(path) and any(n.endswith(WEIGHTS) for n in os.listdir(path))

    def there(sub: str) -> bool:
        return os.path.exists(os.path.join(folder, sub))

    denoiser = "transformer" if flux else "unet"
    parts = [("model_index.json", there("model_index.json"))]
    for sub in [denoiser, "vae", "text_encoder"] + (["text_encoder_2"] if flux or xl else []):
        parts += [(f"{sub}/config.json", there(f"{sub}/config.json")), (f"{sub}/ weights (.safetensors)", weights(sub))]
    for sub in ["tokenizer"] + (["tokenizer_2"] if flux or xl else []):
        parts.append((f"{sub}/", there(sub) and bool(os.listdir(os.path.join(folder, sub)))))
    parts.append(("scheduler/scheduler_config.json", there("scheduler/scheduler_config.json")))
    return parts


def base_folder(path: str, config: Optional[str] = None) -> None:
    """A diffusers base folder holds every part its pipeline loads; the missing ones are named together. Its
    na_engine.json, if any, is read and checked (cli.base_record). A single-file base is checked by
    models.unet_config."""
    from . import cli

    if not os.path.isdir(path):
        if os.path.isfile(path) and not path.endswith(".safetensors"):
            raise NestedAttentionError(
                f"--base {path}: a single-file base must be .safetensors; a .ckpt or .pt file is a pickle, which can "
                "run code when loaded. Use the model's .safetensors release, or its diffusers folder."
            )
        cli.base_record(path, config)
        return
    index = _json_or_empty(os.path.join(path, "model_index.json"))
    flux = os.path.isdir(os.path.join(path, "transformer")) or str(index.get("_class_name", "")).startswith("Flux")
    xl = not flux and os.path.isdir(os.path.join(path, "text_encoder_2"))
    missing = [part for part, present in _parts(path, flux, xl) if not present]
    if missing:
        kind = "Flux" if flux else "SDXL" if xl else "SD1.5"
        raise NestedAttentionError(
            f"--base {path} looks like a {kind} diffusers folder but lacks {', '.join(missing)}. Pass the model's "
            "whole folder as downloaded (weights as .safetensors)."
        )
    cli.base_record(path, config)


def _json_or_empty(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# -- catalogues ----------------------------------------------------------------------------------


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _seed(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _list_of(name: str, value, ok: Callable, what: str) -> List[str]:
    """Faults of a list field whose every item must pass ``ok`` (``what``: the item, described)."""
    if not isinstance(value, list) or not value:
        return [f"{name}: expected a list of {what}, not {value!r}"]
    return [f"{name}[{i}]: expected {what}, not {v!r}" for i, v in enumerate(value) if not ok(v)]


def _subjects(value) -> List[str]:
    faults = _list_of("subjects", value, lambda s: isinstance(s, dict), '{"name", "images", "trigger"}')
    for i, s in enumerate(value if not faults else []):
        where = f"subjects[{i}]"
        faults += [f"{where}.{k}: expected text, not {s.get(k)!r}" for k in ("name", "trigger") if not _text(s.get(k))]
        images = s.get("images")
        if not (_text(images) or (isinstance(images, list) and images and all(_text(p) for p in images))):
            faults.append(f"{where}.images: expected a photo or folder path, or a list of photo paths, not {images!r}")
        faults += [f"{where}: unknown field {k!r}" for k in sorted(set(s) - {"name", "images", "trigger"})]
    return faults


CATALOGUE: Dict[str, Callable] = {  # field -> the faults of its value
    "prompts": lambda v: _list_of("prompts", v, _text, "prompts (text)"),
    "subjects": _subjects,
    "seeds": lambda v: _list_of("seeds", v, _seed, "whole numbers 0 to 2**63 - 1, e.g. [1, 2]"),
    "negative": lambda v: [] if isinstance(v, str) else [f"negative: expected text, not {v!r}"],
}


def catalogue(path: str, spec) -> None:
    """A JSON catalogue's fields, each of its type: every fault named by field and row, nothing rendered."""
    if not isinstance(spec, dict):
        raise NestedAttentionError(
            f'{path} must hold {{"prompts": [...], "subjects": [{{"name", "images", "trigger"}}], "seeds": [...]}}, '
            f"not a {type(spec).__name__}."
        )
    faults = [f"{name} is missing" for name in ("prompts", "subjects") if name not in spec]
    faults += [f"unknown field {k!r} (the fields are {', '.join(CATALOGUE)})" for k in spec if k not in CATALOGUE]
    for name, check in CATALOGUE.items():
        if name in spec:
            faults += check(spec[name])
    if faults:
        raise NestedAttentionError(f"{path}: {len(faults)} problems, nothing rendered:\n  " + "\n  ".join(faults))
