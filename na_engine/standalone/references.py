"""Reference photos as a user gives them: the subject's box, padded to a square, never cropped away.

    pad_square(photo)                       # the photo on a square canvas of its border colour
    subject_box(image, mask)                # the subject's box (10% margin), background kept
    subject_box(image, mask, white=True)    # ...with a white background where the mask says background
    augment(reference, rng)                 # zoom out, shift, flip, brightness and contrast; the subject stays whole

The CLIP image processors resize a photo's short side and then centre-crop it, which cuts the ends off a
tall or wide subject (a bottle's neck). Every reference goes through ``pad_square`` first: the trainer's and
the generator's, so what an encoder was trained on is what it is given.
"""

from __future__ import annotations

import random

import numpy as np


def border_colour(image) -> tuple:
    """The median colour of the image's outermost pixels: the colour a pad continues the photo with."""
    a = np.asarray(image.convert("RGB"))
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (2W + 2H, 3)
    return tuple(int(c) for c in np.median(border, axis=0))


def pad_square(image, fill: tuple | None = None):
    """The image centred on a square canvas of ``fill`` (default: its border colour); a square is returned as is."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill or border_colour(image))
    canvas.paste(image.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return canvas


def subject_box(image, mask, white: bool = False):
    """The subject's box (10% margin) cut from ``image``; with ``white``, background pixels (by ``mask``) go white.
    Without a mask (or an empty one) the whole image is the subject."""
    from PIL import Image

    if mask is None or mask.getbbox() is None:
        return image
    left, top, right, bottom = mask.getbbox()
    mx, my = (right - left) // 10, (bottom - top) // 10
    box = (max(0, left - mx), max(0, top - my), min(image.width, right + mx), min(image.height, bottom + my))
    if white:
        image = Image.composite(image, Image.new("RGB", image.size, (255, 255, 255)), mask)
    return image.crop(box)


def augment(image, rng: random.Random):
    """A square reference, zoomed out by up to 20% and shifted within the margin, maybe mirrored, with
    brightness and contrast +-10%: no part of the subject is cut away."""
    from PIL import Image, ImageEnhance, ImageOps

    image = pad_square(image)
    side = image.width
    canvas_side = int(round(side * rng.uniform(1.0, 1.2)))
    canvas = Image.new("RGB", (canvas_side, canvas_side), border_colour(image))
    canvas.paste(image, (rng.randint(0, canvas_side - side), rng.randint(0, canvas_side - side)))
    if rng.random() < 0.5:
        canvas = ImageOps.mirror(canvas)
    canvas = ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.9, 1.1))
    return ImageEnhance.Contrast(canvas).enhance(rng.uniform(0.9, 1.1))
