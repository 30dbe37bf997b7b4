"""python -m na_engine prepare: a folder of subject photos -> a training set.

Output folder layout, read by python -m na_engine train:
    <name>.png        the photo, cropped or padded to a square of --resolution
    <name>.txt        its caption, holding the class word
    <name>.mask.png   the subject mask, same square (only with --masks)
    dataset.json      {"class_word", "class_words", "resolution", "items": [names], "triggers": [per item],
                       "skipped": [{"file", "reason"}]}

Several class words (--class-word bottle box mug) train one encoder over several kinds: each
caption must then hold exactly one of them, and that word is the item's trigger.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import NestedAttentionError, command_line
from ..tokens import has_word
from . import cli

DATASET_FILE = "dataset.json"


def square(image, resolution: int, mode: str, fill):
    """Centre crop (mode 'crop') or pad with ``fill`` (mode 'pad') to a square, then resize."""
    from PIL import Image, ImageOps

    w, h = image.size
    if mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    else:
        image = ImageOps.pad(image, (max(w, h), max(w, h)), color=fill, centering=(0.5, 0.5))
    resample = Image.NEAREST if image.mode == "L" else Image.LANCZOS
    return image.resize((resolution, resolution), resample)


def prepare(
    src: str,
    out: str,
    class_word: Union[str, Sequence[str]],
    resolution: int = 512,
    mode: str = "crop",
    template: str = "a photo of a {class}",
    keep_captions: bool = False,
    masks: Optional[str] = None,
) -> dict:
    """Write the training set; returns the dataset record (also saved as dataset.json)."""
    words = [class_word] if isinstance(class_word, str) else list(class_word)
    if not words or not all(w.strip() for w in words):
        raise NestedAttentionError(
            "--class-word is required: the word that names the subject's kind, e.g. 'bottle', 'dog' or 'person'."
        )
    if len(words) > 1 and not keep_captions:
        raise NestedAttentionError(
            f"Several class words ({', '.join(words)}) need --keep-captions: each photo's own caption says which "
            "one it shows."
        )
    if "{class}" not in template:
        raise NestedAttentionError(
            f"The caption template {template!r} has no {{class}} placeholder for the class word."
        )
    if mode not in ("crop", "pad"):
        raise NestedAttentionError(f"--mode must be 'crop' or 'pad', not {mode!r}.")
    if not os.path.isdir(src):
        raise NestedAttentionError(f"Photo folder not found: {src}")
    files = sorted(f for f in os.listdir(src) if f.lower().endswith(cli.IMAGE_EXTS))
    if not files:
        raise NestedAttentionError(f"{src} holds no images ({', '.join(cli.IMAGE_EXTS)}).")
    triggers = _check_captions(src, files, words, template, keep_captions)
    os.makedirs(out, exist_ok=True)
    items: List[str] = []
    item_triggers: List[str] = []
    skipped: List[dict] = []
    for file in files:
        name = os.path.splitext(file)[0]
        image, mask, reason = _read(os.path.join(src, file), _mask_path(masks, name))
        if reason:
            skipped.append({"file": file, "reason": reason})
            continue
        square(image, resolution, mode, (255, 255, 255)).save(os.path.join(out, f"{name}.png"))
        if mask is not None:
            square(mask, resolution, mode, 0).save(os.path.join(out, f"{name}.mask.png"))
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(_caption(src, name, words[0], template, keep_captions))
        items.append(name)
        item_triggers.append(triggers[file])
    if not items:
        raise NestedAttentionError(
            f"None of the {len(files)} images in {src} could be read: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        )
    record = {
        "class_word": words[0],
        "class_words": words,
        "resolution": resolution,
        "items": items,
        "triggers": item_triggers,
        "skipped": skipped,
    }
    with open(os.path.join(out, DATASET_FILE), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _check_captions(src: str, files: List[str], words: List[str], template: str, keep: bool) -> dict:
    """Every caption must hold exactly one class word: its positions are where the subject binds.
    Returns file -> that word."""
    found = {}
    for file in files:
        name = os.path.splitext(file)[0]
        if len(words) > 1 and not os.path.isfile(os.path.join(src, name + ".txt")):
            raise NestedAttentionError(
                f"{file} has no caption file ({name}.txt): with several class words each photo's caption must say "
                "which one it shows."
            )
        caption = _caption(src, name, words[0], template, keep)
        present = [w for w in words if has_word(caption, w)]
        if len(present) != 1:
            where = (
                os.path.join(src, name + ".txt")
                if keep and os.path.isfile(os.path.join(src, name + ".txt"))
                else "the template"
            )
            what = f"the class word {words[0]!r}" if len(words) == 1 else f"one of the class words {words}"
            problem = "does not contain" if not present else f"holds {present}, so it must contain only"
            raise NestedAttentionError(f"The caption of {file} ({where}: {caption!r}) {problem} {what}.")
        found[file] = present[0]
    return found


def _caption(src: str, name: str, class_word: str, template: str, keep: bool) -> str:
    own = os.path.join(src, name + ".txt")
    if keep and os.path.isfile(own):
        with open(own) as f:
            return f.read().strip()
    return template.replace("{class}", class_word)


def _mask_path(masks: Optional[str], name: str) -> Optional[str]:
    if masks is None:
        return None
    found = [
        os.path.join(masks, name + ext) for ext in cli.IMAGE_EXTS if os.path.isfile(os.path.join(masks, name + ext))
    ]
    return found[0] if found else ""


def _read(path: str, mask_path: Optional[str]) -> Tuple[object, object, str]:
    """(image RGB, mask L or None, reason it was skipped or '')."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:  # truncated, corrupt or not an image
        return None, None, f"unreadable image ({type(e).__name__}: {e})"
    if mask_path is None:
        return image, None, ""
    if not mask_path:
        return None, None, "no mask with this name in the masks folder"
    try:
        with Image.open(mask_path) as im:
            mask = im.convert("L")
    except Exception as e:
        return None, None, f"unreadable mask ({type(e).__name__}: {e})"
    if mask.size != image.size:
        return None, None, f"mask size {mask.size} differs from image size {image.size}"
    return image, mask, ""


@command_line
def main(argv=None) -> int:
    p = cli.parser("prepare", __doc__)
    p.add_argument("--src", required=True, help="folder of subject photos (optionally <name>.txt captions beside them)")
    p.add_argument("--out", required=True, help="training set folder to write")
    p.add_argument(
        "--class-word",
        required=True,
        nargs="+",
        help="the word for the subject's kind: bottle, dog, person... (several: one encoder for several kinds, "
        "with --keep-captions)",
    )
    p.add_argument(
        "--template", default="a photo of a {class}", help="caption template; {class} becomes the class word"
    )
    p.add_argument("--keep-captions", action="store_true", help="use <name>.txt beside each photo where present")
    p.add_argument("--masks", help="folder of subject masks named like the photos (white = subject)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mode", default="crop", choices=("crop", "pad"))
    args = p.parse_args(argv)
    record = prepare(
        args.src, args.out, args.class_word, args.resolution, args.mode, args.template, args.keep_captions, args.masks
    )
    print(f"prepared {len(record['items'])} images in {args.out}")
    if record["skipped"]:
        print(f"skipped {len(record['skipped'])}:")
        for s in record["skipped"]:
            print(f"  {s['file']}: {s['reason']}")
    return 0
