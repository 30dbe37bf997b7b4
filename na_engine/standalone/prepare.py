"""python -m na_engine prepare: a folder of subject photos -> a training set.

Input: photos in --src, and in its subfolders one subject each:
    src/mybottle/1.jpg, src/mybottle/2.jpg    two photos of one subject: in training, either one is the
                                              other's reference (another scene, as a user gives one)
    src/shelf.jpg + shelf.txt + shelf.json    a photo of two subjects: the caption holds both class words, and
                                              shelf.json = {"subjects": {"bottle": "mybottle", "mug": "mymug"}}
                                              names each word's subject; masks/shelf.bottle.png, masks/shelf.mug.png
Masks (--masks) mirror --src: masks/mybottle/1.png, masks/shelf.bottle.png.

Output folder layout, read by python -m na_engine train:
    <name>.png        the photo, cropped or padded to a square of --resolution (a subfolder's: <folder>__<name>)
    <name>.txt        its caption, holding the class word(s)
    <name>.mask.png   the subject mask, same square (only with --masks; <name>.<word>.mask.png per subject of
                      a photo of several)
    dataset.json      {"class_word", "class_words", "resolution", "items": [names], "triggers": [per item],
                       "subjects": [per item: [{"trigger", "group", "mask"}]], "skipped": [{"file", "reason"}]}

Several class words (--class-word bottle box mug) train one encoder over several kinds: each
caption must then hold exactly one of them, and that word is the item's trigger (a photo of several
subjects holds one per subject).
"""

from __future__ import annotations

import json
import os
import shutil
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
    overwrite: bool = False,
) -> dict:
    """Write the training set; returns the dataset record (also saved as dataset.json).

    ``out`` must be empty or new (``overwrite``: it may hold files, and same-named ones are replaced); it is never
    ``src`` or inside it, so the photos are never replaced by their crops."""
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
    if resolution < 8:
        raise NestedAttentionError(f"--resolution must be at least 8 pixels, not {resolution}.")
    _check_out(src, out, overwrite, masks)
    files = _photos(src)
    if not files:
        raise NestedAttentionError(f"{src} holds no images ({', '.join(cli.IMAGE_EXTS)}).")
    triggers = _check_captions(src, files, words, template, keep_captions)
    groups_of = {file: _groups(src, os.path.splitext(file)[0], triggers[file]) for file in files}
    several = [file for file, found in triggers.items() if len(found) > 1]
    if several and masks is None:
        raise NestedAttentionError(
            f"{several[0]} shows several subjects ({', '.join(triggers[several[0]])}); without --masks each would "
            "take the whole photo as its reference. Prepare with --masks (masks/<name>.<word>.png per subject), or "
            "move the photos of several subjects out of the folder."
        )
    final, out = os.path.normpath(os.path.abspath(out)), _staging(out, overwrite)
    items: List[str] = []
    item_subjects_: List[List[dict]] = []
    skipped: List[dict] = []
    for file in files:
        stem = os.path.splitext(file)[0]
        name = stem.replace("/", "__")
        found, groups = triggers[file], groups_of[file]
        suffixes = [""] if len(found) == 1 else [f".{w}" for w in found]
        image, subject_masks, reason = _read(os.path.join(src, file), [_mask_path(masks, stem + x) for x in suffixes])
        if reason:
            skipped.append({"file": file, "reason": reason})
            continue
        square(image, resolution, mode, (255, 255, 255)).save(os.path.join(out, f"{name}.png"))
        subjects = []
        for word, suffix, mask in zip(found, suffixes, subject_masks):
            mask_file = None
            if mask is not None:
                mask_file = f"{name}{suffix}.mask.png"
                square(mask, resolution, mode, 0).save(os.path.join(out, mask_file))
            subjects.append({"trigger": word, "group": groups[word], "mask": mask_file})
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(_caption(src, stem, words[0], template, keep_captions))
        items.append(name)
        item_subjects_.append(subjects)
    if not items:
        if out != final:
            shutil.rmtree(out)
        raise NestedAttentionError(
            f"None of the {len(files)} images in {src} could be read: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
        )
    record = {
        "class_word": words[0],
        "class_words": words,
        "resolution": resolution,
        "items": items,
        "triggers": [subjects[0]["trigger"] for subjects in item_subjects_],
        "subjects": item_subjects_,
        "skipped": skipped,
    }
    with open(os.path.join(out, DATASET_FILE + ".partial"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(out, DATASET_FILE + ".partial"), os.path.join(out, DATASET_FILE))
    if out != final:
        if os.path.isdir(final):
            os.rmdir(final)  # empty, as _check_out found it
        os.replace(out, final)
    return record


def _staging(out: str, overwrite: bool) -> str:
    """Where the set is written: a new or empty --out is made whole under a hidden name beside it and renamed at
    the end, so that a run that fails (a full disk, Ctrl-C) leaves nothing under --out and the same command runs
    again; one left by such a run is removed first. --overwrite into a folder holding files writes into it."""
    out = os.path.normpath(os.path.abspath(out))
    if overwrite and os.path.isdir(out) and os.listdir(out):
        return out
    stage = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.prepare.partial")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    return stage


def _check_out(src: str, out: str, overwrite: bool, masks: Optional[str] = None) -> None:
    """Refuse an --out that would replace the user's photos or masks, or mix with files prepare did not write."""
    real_out = os.path.realpath(out)
    for what, folder in (("photo", src), ("mask", masks)):
        real = os.path.realpath(folder) if folder else None
        if real and (real_out == real or real_out.startswith(real + os.sep)):
            raise NestedAttentionError(
                f"--out {out} is {'the' if real_out == real else 'inside the'} {what} folder {folder}: the crops "
                f"would replace or mix with your {what}s. Give a new folder outside it."
            )
    if os.path.exists(out) and not os.path.isdir(out):
        raise NestedAttentionError(f"--out {out} is a file; give a folder (new or empty) for the training set.")
    held = os.listdir(out) if os.path.isdir(out) else []
    if held and not overwrite:
        raise NestedAttentionError(
            f"--out {out} already holds {len(held)} files (e.g. {sorted(held)[0]}). Give a new or empty folder, or "
            "add --overwrite to write into it (same-named files are replaced, others left as they are)."
        )


def item_subjects(record: dict) -> List[List[dict]]:
    """Per item, its subjects [{"trigger", "group", "mask"}]; a record written before photos could be grouped
    gives each item one subject of its own, with the mask file named like the item."""
    if "subjects" in record:
        return record["subjects"]
    triggers = record.get("triggers") or [record["class_word"]] * len(record["items"])
    return [[{"trigger": t, "group": i, "mask": i + ".mask.png"}] for i, t in zip(record["items"], triggers)]


def _photos(src: str) -> List[str]:
    """Image paths relative to src: its own photos, then each subfolder's (one subject a folder)."""
    found, links, deeper = [], [], []
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if os.path.islink(path):
            links.append(entry)
        elif os.path.isfile(path) and entry.lower().endswith(cli.IMAGE_EXTS):
            found.append(entry)
        elif os.path.isdir(path) and entry != "masks":
            for name in sorted(os.listdir(path)):
                inner = os.path.join(path, name)
                if os.path.islink(inner):
                    links.append(f"{entry}/{name}")
                elif os.path.isdir(inner) and _holds_images(inner):
                    deeper.append(f"{entry}/{name}/")
                elif os.path.isfile(inner) and name.lower().endswith(cli.IMAGE_EXTS):
                    found.append(f"{entry}/{name}")
    if links:
        raise NestedAttentionError(
            f"{src} holds symbolic links ({', '.join(links[:5])}{' ...' if len(links) > 5 else ''}); prepare does not "
            "follow them, as a link out of the photo folder or back into it would read photos from elsewhere or "
            "twice. Copy the photos in instead."
        )
    if deeper:
        raise NestedAttentionError(
            f"{src} has photos two folders deep ({', '.join(deeper[:5])}{' ...' if len(deeper) > 5 else ''}); prepare "
            "reads the folder's own photos and one subfolder per subject. Move each subject's photos into one "
            "subfolder of it."
        )
    stems: dict = {}
    for file in found:  # by the training image's name: a/b.jpg and a__b.jpg would both become a__b
        stems.setdefault(os.path.splitext(file)[0].replace("/", "__"), []).append(file)
    clashes = [names for names in stems.values() if len(names) > 1]
    if clashes:
        raise NestedAttentionError(
            "Photos whose names differ only in their extension (or a subfolder's '/' against '__') would become one "
            "training image: "
            + "; ".join(" and ".join(os.path.join(src, n) for n in names) for names in clashes)
            + ". Rename one of each."
        )
    return found


def _holds_images(folder: str) -> bool:
    return any(f.lower().endswith(cli.IMAGE_EXTS) for _, _, names in os.walk(folder) for f in names)


def _groups(src: str, stem: str, words: List[str]) -> dict:
    """class word -> the subject it shows: named in <name>.json (a photo of several subjects must have one), else
    the photo's subfolder, else its own name. A <name>.json naming a word its caption lacks is refused."""
    sidecar = os.path.join(src, stem + ".json")
    if len(words) == 1 and not os.path.isfile(sidecar):
        return {words[0]: stem.split("/")[0] if "/" in stem else stem}
    try:
        with open(sidecar) as f:
            named = json.load(f)["subjects"]
        groups = {w: str(named[w]) for w in words}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NestedAttentionError(
            f"The caption of {stem} holds the class word{'s' * (len(words) > 1)} {', '.join(words)}, so {sidecar} "
            f'must name the subject each shows, e.g. {{"subjects": {{"{words[0]}": "my{words[0]}", ...}}}} '
            f"({type(e).__name__}: {e})."
        ) from None
    extra = sorted(str(w) for w in named if w not in words)
    if extra:
        raise NestedAttentionError(
            f"{sidecar} names {', '.join(map(repr, extra))}, which the caption of {stem} lacks (it holds "
            f"{', '.join(words)}): that subject would never be bound. Put the word in the caption, or take it out of "
            "the file."
        )
    return groups


def _check_captions(src: str, files: List[str], words: List[str], template: str, keep: bool) -> dict:
    """Every caption must hold one class word, or several different ones for a photo of several subjects
    (with <name>.json): their positions are where each subject binds. Returns file -> those words."""
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
        if len(present) > 1 and os.path.isfile(os.path.join(src, name + ".json")):
            found[file] = present
            continue
        if len(present) != 1:
            where = (
                os.path.join(src, name + ".txt")
                if keep and os.path.isfile(os.path.join(src, name + ".txt"))
                else "the template"
            )
            what = f"the class word {words[0]!r}" if len(words) == 1 else f"one of the class words {words}"
            problem = "does not contain" if not present else f"holds {present}, so it must contain only"
            several = f" (a photo of several subjects names them in {name}.json)" if present else ""
            raise NestedAttentionError(f"The caption of {file} ({where}: {caption!r}) {problem} {what}{several}.")
        found[file] = present
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


def _read(path: str, mask_paths: List[Optional[str]]) -> Tuple[object, list, str]:
    """(image RGB, one mask L or None per subject, reason it was skipped or '')."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:  # truncated, corrupt or not an image
        return None, [], f"unreadable image ({type(e).__name__}: {e})"
    masks = []
    for mask_path in mask_paths:
        if mask_path is None:
            masks.append(None)
            continue
        if not mask_path:
            return None, [], "no mask with this name in the masks folder"
        try:
            with Image.open(mask_path) as im:
                mask = im.convert("L")
        except Exception as e:
            return None, [], f"unreadable mask ({type(e).__name__}: {e})"
        if mask.size != image.size:
            return None, [], f"mask size {mask.size} differs from image size {image.size}"
        masks.append(mask)
    return image, masks, ""


@command_line(interrupted="run the same command again.")
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
    p.add_argument("--resolution", type=cli.at_least(8), default=512)
    p.add_argument("--mode", default="crop", choices=("crop", "pad"))
    p.add_argument(
        "--overwrite", action="store_true", help="write into an --out that holds files (same names are replaced)"
    )
    args = p.parse_args(argv)
    record = prepare(
        args.src,
        args.out,
        args.class_word,
        args.resolution,
        args.mode,
        args.template,
        args.keep_captions,
        args.masks,
        args.overwrite,
    )
    print(f"prepared {len(record['items'])} images in {args.out}")
    if record["skipped"]:
        print(f"skipped {len(record['skipped'])}:")
        for s in record["skipped"]:
            print(f"  {s['file']}: {s['reason']}")
    return 0
