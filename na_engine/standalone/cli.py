"""What the standalone commands share: the model arguments, dtypes, photo files, options from a config.

python -m na_engine prepare | train | generate | inspect   (na_engine/__main__.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Dict, List

import torch

from ..errors import NestedAttentionError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def parser(command: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m na_engine {command}",
        description=doc.split("\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected failure")
    return p


def at_least(low, kind=int):
    """An argparse type: a number of ``kind`` no smaller than ``low``, with a message saying so."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' * (kind is int)}number, not {text!r}") from None
        if value < low or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value

    parse.__name__ = f"at_least_{low}"
    return parse


def check_writable(option: str, folder: str) -> None:
    """``folder`` (to be made, maybe) lies under a writable folder, with no file in the way."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise NestedAttentionError(f"{option}: {existing} is a file, not a folder.")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise NestedAttentionError(f"{option}: {existing} is not writable.")


def base_record(base: str, base_config: str | None = None) -> dict:
    """What a base folder (or a single file's config folder) records for na_engine in na_engine.json: the
    latents its UNet was trained on, its resolution. Empty for a base without one (SD1.5, SDXL). A record that is
    not JSON, or holds a value the commands cannot honour, is refused, naming the file and the field."""
    import json

    for folder in (base, base_config):
        path = os.path.join(folder, "na_engine.json") if folder and os.path.isdir(folder) else ""
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                record = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise NestedAttentionError(f"{path} is not valid JSON ({e}); fix it or remove it.") from None
        faults = [] if isinstance(record, dict) else [f"expected an object, not {type(record).__name__}"]
        record = record if isinstance(record, dict) else {}
        if record.get("latents", "sample") not in ("mean", "sample"):
            faults.append(f'"latents" is {record["latents"]!r}; expected "mean" or "sample"')
        size = record.get("resolution", 8)
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
            faults.append(f'"resolution" is {size!r}; expected a whole multiple of 8')
        if faults:
            raise NestedAttentionError(f"{path}: {'; '.join(faults)}.")
        return record
    return {}


def seed(text: str) -> int:
    """An argparse type: a seed torch accepts, 0 to 2**63 - 1."""
    value = at_least(0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, not {text}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--base, --base-config and --clip-vision, worded once for every command."""
    p.add_argument(
        "--base", required=True, help="diffusers folder (SD1.5 or SDXL), or a single-file checkpoint with --base-config"
    )
    p.add_argument("--base-config", help="local diffusers folder holding the configs of a single-file --base")
    p.add_argument("--clip-vision", required=True, help="CLIP vision folder or .safetensors file")


def add_config_arguments(p: argparse.ArgumentParser, config: type, helps: Dict[str, str], **extra: dict) -> None:
    """One --option per field of the dataclass ``config`` named in ``helps``, its default the dataclass's own.

    ``extra[field]`` adds argparse keywords (``choices``; ``flag`` renames the option). An option's type is its
    field's annotation (Optional[X]: X)."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name not in helps:
            continue
        more = dict(extra.get(f.name, {}))
        flag = more.pop("flag", "--" + f.name.replace("_", "-"))
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if not has_default:
            kind = dict(required=True)
        elif isinstance(default, bool):
            kind = dict(action="store_true")
        elif isinstance(default, list):
            kind = dict(action="append", default=default)
        else:
            kind = dict(type=value_type(hints[f.name]), default=default)
        p.add_argument(flag, dest=f.name, help=helps[f.name], **{**kind, **more})


def value_type(annotation) -> type:
    """The type of a field's value: int for int and for Optional[int]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def check_launch() -> None:
    """Refuse the launch that asked for N CPU processes but started one.

    ``accelerate launch --cpu --num_processes N`` without mpirun sets MASTER_ADDR and starts a single
    process with no world size; it would train alone, N times slower than asked, and say nothing."""
    env = os.environ
    asked_many = "MASTER_ADDR" in env and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    started_one = not any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if asked_many and started_one:
        raise NestedAttentionError(
            "accelerate launch --cpu --num_processes N starts a single process here (its CPU launcher needs mpirun "
            "and --mpirun_hostfile). For several CPU processes use `accelerate launch --multi_gpu --num_processes N "
            "...` (torchrun with the gloo backend; it runs on CPU when no GPU is visible) or `torchrun "
            "--nproc_per_node N -m na_engine ...`. See docs/TRAINING.md."
        )


def photo_files(path: str) -> List[str]:
    """A photo, or the photos of a folder (subject masks, ``*.mask.png``, left out), sorted."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and not f.endswith(".mask.png"))
        files = [os.path.join(path, f) for f in names]
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise NestedAttentionError(f"No subject images at {path}.")
    return files
