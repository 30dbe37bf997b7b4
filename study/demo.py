"""python -m study demo --out DIR: personalised images of held-out products from the committed study weights.

References of held-out identities (never seen in training) are rendered in one scene; the nested adapter
puts each product into three new scenes through the project's own command, `python -m na_engine generate`
(a CSV catalogue). DIR gets the references, the images with their attention maps, and grid.png:
reference | three new scenes, one row per product.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

from PIL import Image, ImageDraw

from . import world
from .evaluate import reference_photo

SCENES = [("teal", "left", "large"), ("yellow", "right", "small"), ("purple", "centre", "large")]
REFERENCE = ("grey", "centre", "large")


def demo(weights: str, out: str, products: int = 6) -> str:
    from na_engine.standalone.generate import main as generate

    adapter = os.path.join(weights, "encoders", "adapters", "nested.safetensors")
    if not os.path.isfile(adapter) or not os.path.isfile(os.path.join(weights, "base", "unet", "config.json")):
        raise SystemExit(f"[study demo] no trained study weights in {weights} yet (run python -m study run).")
    with open(os.path.join(weights, "world.json")) as f:
        heldout = [world.Identity.from_json(i) for i in json.load(f)["heldout"]]
    with open(os.path.join(weights, "base", "study_base.json")) as f:
        resolution = int(json.load(f)["resolution"])
    chosen = [heldout[k * len(heldout) // products] for k in range(products)]  # kinds in turn
    refs = os.path.join(out, "references")
    os.makedirs(refs, exist_ok=True)
    rows = []
    for ident in chosen:
        scene = world.Scene(REFERENCE[0], [world.Placed(ident, REFERENCE[1], REFERENCE[2])])
        name = f"product{ident.index}"
        reference_photo(scene, resolution).save(os.path.join(refs, name + ".png"))
        for background, placement, size in SCENES:
            prompt = world.caption(world.Scene(background, [world.Placed(ident, placement, size)]))
            rows.append([prompt, f"references/{name}.png", ident.kind, 1])
    jobs = os.path.join(out, "catalogue.csv")
    with open(jobs, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "subject", "trigger", "seed"], *rows])
    images = os.path.join(out, "images")
    shutil.rmtree(images, ignore_errors=True)  # the grid reads the images in catalogue order
    args = ["--base", os.path.join(weights, "base"), "--clip-vision", os.path.join(weights, "encoders", "vision")]
    args += ["--adapter", adapter, "--batch", jobs, "--steps", "25", "--cfg", "4", "--size", str(resolution)]
    if generate([*args, "--out", images]) != 0:
        raise SystemExit("[study demo] generation failed")
    return grid(out, chosen, images)


def grid(out: str, chosen, images: str, cell: int = 128) -> str:
    files = sorted(f for f in os.listdir(images) if f.endswith(".png") and not f.endswith(".maps.png"))
    sheet = Image.new("RGB", ((1 + len(SCENES)) * cell, 16 + len(chosen) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(["reference (held out)"] + [" ".join(s) for s in SCENES]):
        draw.text((c * cell + 4, 2), title, fill=(0, 0, 0))
    for r, ident in enumerate(chosen):
        ref = Image.open(os.path.join(out, "references", f"product{ident.index}.png"))
        sheet.paste(ref.resize((cell, cell), Image.NEAREST), (0, 16 + r * cell))
        for c in range(len(SCENES)):
            image = Image.open(os.path.join(images, files[r * len(SCENES) + c]))
            sheet.paste(image.resize((cell, cell), Image.NEAREST), ((c + 1) * cell, 16 + r * cell))
    path = os.path.join(out, "grid.png")
    sheet.save(path)
    return path
