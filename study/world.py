"""The miniature product world (round 9 on): discrete, compositional products read back by rules from pixels.

    products = all_products()                          # 450: kind x body x top band x bottom band
    train, heldout = split(products, heldout=90, seed=0)  # held-out = unseen combinations of seen values
    scene = Scene("grey", [Placed(products[0], "left", "large", pose="lying", light="left")])
    image = render(scene, jitter=rng)                  # (32, 32, 3) uint8
    caption(scene, described=True)  # "lying lit left red blue top green bottom bottle on grey left large"
    read(image)                                        # [Reading(kind="bottle", body="red", ...)]

A product's identity is four discrete parts at distinct places: its kind (the silhouette: a bottle's neck, a
mug's handle), its body colour (the middle half) and the colours of a top and a bottom band (a quarter of its
height each). The prompt controls the scene (background, placement, size) and two attributes of the product
itself: its pose (upright, or lying with its top to the right) and the side its light comes from (the far half
is shaded). A reference photo shows both attributes at their other value (Placed.flipped), so that a method that
copies the reference rather than binding its identity loses the prompt's attributes.

Every colour is one of a small palette and drawn flat, so the reader (``read``) needs no learned probe: each pixel
goes to its nearest palette colour, the background is the border's majority, and the products are the large
connected components of the rest; kind, bands, pose, light, size and placement follow from fixed rules.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field, replace

import numpy as np

RESOLUTION = 32
KINDS = ("bottle", "box", "mug")
COLOURS = {  # product colours: name -> RGB, saturated and far apart, lit and SHADED both far from every background
    "red": (225, 35, 35),
    "green": (40, 185, 55),
    "blue": (45, 75, 230),
    "yellow": (240, 210, 25),
    "magenta": (210, 45, 210),
    "cyan": (35, 210, 215),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (140, 140, 140), "black": (12, 12, 12), "pink": (250, 175, 190)}
SHADE = 0.55  # the far half's brightness, relative to the lit half
PLACEMENTS = {"left": 9, "centre": 16, "right": 23}  # the product's centre column (before jitter)
SIZES = {"small": 16, "large": 22}  # an upright product's height in pixels
WIDTHS = {"small": 10, "large": 14}  # an upright bottle's or box's body width; a mug adds its handle
POSES = ("upright", "lying")  # lying: turned 90 degrees clockwise, its top to the right
LIGHTS = ("left", "right")  # the side the light comes from; the other half is shaded
JITTER = 1  # unstated shifts of up to this many pixels in x and y
PARTS = ("kind", "body", "top", "bottom")  # a product's identity, in Product's field order
SCENE = ("background", "placement", "size")
ATTRIBUTES = ("pose", "light")


@dataclass(frozen=True)
class Product:
    kind: str
    body: str
    top: str
    bottom: str

    @property
    def name(self) -> str:
        return f"{self.body}-{self.top}-{self.bottom}-{self.kind}"

    def words(self) -> str:
        """The look in words, before the class word: "red blue top green bottom"."""
        return f"{self.body} {self.top} top {self.bottom} bottom"


@dataclass(frozen=True)
class Placed:
    product: Product
    placement: str
    size: str
    pose: str = "upright"
    light: str = "left"

    def flipped(self) -> "Placed":
        """The same product with pose and light at their other values: how a reference contradicts a prompt."""
        other = {v: w for pair in (POSES, LIGHTS) for v, w in (pair, pair[::-1])}
        return replace(self, pose=other[self.pose], light=other[self.light])


@dataclass(frozen=True)
class Scene:
    background: str
    products: list[Placed] = field(default_factory=list)


def all_products() -> list[Product]:
    """Every product: bands differ from the body (a band the body's colour would not be seen)."""
    colours = list(COLOURS)
    return [
        Product(kind, body, top, bottom)
        for kind, body, top, bottom in itertools.product(KINDS, colours, colours, colours)
        if top != body and bottom != body
    ]


def split(products: list[Product], heldout: int, seed: int = 0) -> tuple[list[Product], list[Product]]:
    """(train, held-out): held-out products are unseen combinations; every value of every part stays seen in
    training with every other part's values (each pair of parts' values), so only the combination is new."""
    pairs = list(itertools.combinations(PARTS, 2))

    def keys(p: Product) -> list:
        return [(a, getattr(p, a), b, getattr(p, b)) for a, b in pairs]

    left = collections.Counter(k for p in products for k in keys(p))  # pair -> products still in training
    held: list[Product] = []
    for i in np.random.default_rng(seed).permutation(len(products)):
        if len(held) == heldout:
            break
        if all(left[k] > 1 for k in keys(products[i])):  # another training product keeps each of its pairs
            held.append(products[i])
            left.subtract(keys(products[i]))
    if len(held) < heldout:
        raise ValueError(f"only {len(held)} products can be held out with every pair of values still seen")
    return [p for p in products if p not in held], held


def caption(scene: Scene, described: bool = False) -> str:
    """One clause per product: "{pose} lit {light} [{look}] {kind} on {background} {placement} {size}"; two
    products are joined by "and"; ``described`` names each product's look before its class word."""
    clauses = [
        f"{p.pose} lit {p.light} {p.product.words() + ' ' if described else ''}{p.product.kind} "
        f"on {scene.background} {p.placement} {p.size}"
        for p in scene.products
    ]
    return " and ".join(clauses)


def words() -> list[str]:
    """Every word a caption can use."""
    return [
        "top", "bottom", "lit", "on", "and",
        *KINDS, *COLOURS, *BACKGROUNDS, *PLACEMENTS, *SIZES, *POSES, *LIGHTS,
    ]  # fmt: skip


# -- drawing -----------------------------------------------------------------------------------------------


def _upright(product: Product, size: str) -> np.ndarray:
    """(h, w) int8 part map of the upright product: 0 outside, 1 top band, 2 body, 3 bottom band."""
    h, w = SIZES[size], WIDTHS[size]
    band = h // 4
    handle = 3 if product.kind == "mug" else 0
    parts = np.zeros((h, w + handle), np.int8)
    parts[:band, :w], parts[band : h - band, :w], parts[h - band :, :w] = 1, 2, 3
    if product.kind == "bottle":  # a neck: the top band is half the body's width
        neck = w // 4
        parts[:band, :neck] = 0
        parts[:band, w - neck : w] = 0
    if product.kind == "mug":  # a handle on the right of the body's rows, the body's colour
        rows = slice(band + 1, h - band - 1)
        parts[rows, w : w + handle] = 2
        parts[band + 3 : h - band - 3, w : w + handle - 1] = 0  # its hole
    return parts


def _product_pixels(placed: Placed) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) float RGB and (h, w) bool mask of a placed product, posed and lit, before placement."""
    parts = _upright(placed.product, placed.size)
    if placed.pose == "lying":
        parts = np.rot90(parts, k=-1)  # clockwise: the top to the right
    p = placed.product
    table = np.array([(0, 0, 0), COLOURS[p.top], COLOURS[p.body], COLOURS[p.bottom]], np.float32)
    rgb = table[parts]
    cols = np.nonzero((parts > 0).any(0))[0]
    middle = (cols[0] + cols[-1] + 1) / 2
    x = np.arange(parts.shape[1]) + 0.5
    far = x > middle if placed.light == "left" else x < middle  # (w,)
    rgb[:, far] *= SHADE
    return rgb, parts > 0


def _origin(placed: Placed, shape: tuple, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left corner of the product's box: centred at its placement and the image's middle row, jittered,
    kept inside the image."""
    h, w = shape
    dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, 2)) if rng is not None else (0, 0)
    left = int(round(PLACEMENTS[placed.placement] - w / 2)) + dx
    top = int(round(RESOLUTION / 2 - h / 2)) + dy
    return min(max(top, 1), RESOLUTION - 1 - h), min(max(left, 1), RESOLUTION - 1 - w)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(RESOLUTION, RESOLUTION, 3) uint8; ``rng`` draws the unstated jitter (None: none)."""
    image = np.empty((RESOLUTION, RESOLUTION, 3), np.float32)
    image[:] = BACKGROUNDS[scene.background]
    for placed in scene.products:
        rgb, mask = _product_pixels(placed)
        top, left = _origin(placed, mask.shape, rng)
        window = image[top : top + mask.shape[0], left : left + mask.shape[1]]
        window[mask] = rgb[mask]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def product_masks(scene: Scene, image: np.ndarray) -> list[np.ndarray]:
    """(RESOLUTION, RESOLUTION) bool per product of ``scene``, from its render ``image``: the pixels that are not the
    background's, split at the middle column when there are two (random_scene keeps a pair apart there)."""
    fore = (np.asarray(image) != np.array(BACKGROUNDS[scene.background], np.uint8)).any(-1)
    if len(scene.products) == 1:
        return [fore]
    left = fore & (np.arange(RESOLUTION) < RESOLUTION // 2)
    return [left, fore & ~left]


def random_placed(rng: np.random.Generator, product: Product, placement: str | None = None) -> Placed:
    return Placed(
        product,
        placement or str(rng.choice(list(PLACEMENTS))),
        str(rng.choice(list(SIZES))),
        str(rng.choice(POSES)),
        str(rng.choice(LIGHTS)),
    )


def reference(rng: np.random.Generator, placed: Placed) -> Scene:
    """Another photo of ``placed``'s product that contradicts it: a random scene, with pose and light at their other
    values (Placed.flipped), so that a method that copies the reference loses the prompt's attributes."""
    other = random_placed(rng, placed.product)
    flipped = placed.flipped()
    return Scene(str(rng.choice(list(BACKGROUNDS))), [replace(other, pose=flipped.pose, light=flipped.light)])


def random_scene(rng: np.random.Generator, product: Product, second: Product | None = None) -> Scene:
    """One product anywhere, or two (``second``): small and upright (so they stay apart), the first on the left
    and the second on the right."""
    background = str(rng.choice(list(BACKGROUNDS)))
    if second is None:
        return Scene(background, [random_placed(rng, product)])
    pair = [random_placed(rng, p, side) for p, side in ((product, "left"), (second, "right"))]
    return Scene(background, [replace(p, size="small", pose="upright") for p in pair])


# -- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the reader sees of one product; None where a part cannot be read."""

    kind: str | None
    body: str | None
    top: str | None
    bottom: str | None
    placement: str
    size: str
    pose: str
    light: str

    def product(self) -> Product | None:
        parts = (self.kind, self.body, self.top, self.bottom)
        return None if None in parts else Product(*parts)


_BG_NAMES, _COLOUR_NAMES = list(BACKGROUNDS), list(COLOURS)
# Every colour a pixel can be: the backgrounds, each product colour lit and shaded. Index < len(_BG_NAMES): a
# background; else product colour (i - n_bg) % n_colours.
_PALETTE = np.array([*BACKGROUNDS.values(), *COLOURS.values(), *(np.array(list(COLOURS.values())) * SHADE)], np.float32)
MIN_PIXELS = 24  # a component smaller than this is noise, not a product


def _nearest(image: np.ndarray) -> np.ndarray:
    """(H, W) int: each pixel's nearest palette entry."""
    d = ((image[:, :, None, :].astype(np.float32) - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, each as a bool mask, largest first."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, stack = np.zeros_like(mask), [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            comp[cy, cx] = True
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return sorted(out, key=lambda c: -int(c.sum()))


def read_background(image: np.ndarray) -> str:
    """The border's majority among the backgrounds (each border pixel to its nearest background)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    bgs = _PALETTE[: len(_BG_NAMES)]
    nearest = ((border[:, None] - bgs[None]) ** 2).sum(-1).argmin(-1)
    return _BG_NAMES[int(np.bincount(nearest, minlength=len(bgs)).argmax())]


def _majority(names: np.ndarray) -> str | None:
    names = names[names >= 0]
    return _COLOUR_NAMES[int(np.bincount(names, minlength=len(_COLOUR_NAMES)).argmax())] if names.size else None


def _kind(parts: np.ndarray) -> str:
    """From the upright silhouette's width per row: a bottle's top quarter is narrower than its bottom one; a
    mug's middle rows are wider than its bands (the handle); a box is even."""
    h = parts.shape[0]
    cols = np.arange(parts.shape[1])
    width = np.array([np.ptp(cols[row]) + 1 if row.any() else 0 for row in parts], np.float32)  # extent, holes in
    q = max(1, h // 4)
    top, bottom, middle = width[:q].mean(), width[h - q :].mean(), np.median(width[q : h - q])
    if top < 0.75 * bottom:
        return "bottle"
    if middle > bottom + 1.5:
        return "mug"
    return "box"


def _read_product(image: np.ndarray, nearest: np.ndarray, comp: np.ndarray) -> Reading:
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    pose = "lying" if w > h else "upright"
    length = max(h, w)
    size = "large" if length >= (SIZES["small"] + SIZES["large"]) / 2 else "small"
    centre = (x0 + x1) / 2
    cut = [(a + b) / 2 for a, b in itertools.pairwise(PLACEMENTS.values())]
    placement = list(PLACEMENTS)[int(np.searchsorted(cut, centre))]
    brightness = image.astype(np.float32).sum(-1) * comp
    mid = (x0 + x1) / 2
    columns = np.arange(image.shape[1]) + 0.5
    left_mean = brightness[:, columns < mid].sum() / max(1, comp[:, columns < mid].sum())
    right_mean = brightness[:, columns >= mid].sum() / max(1, comp[:, columns >= mid].sum())
    light = "left" if left_mean >= right_mean else "right"
    # identity in the upright frame
    colour = np.where(comp, (nearest - len(_BG_NAMES)) % len(_COLOUR_NAMES), -1)
    colour = np.where(nearest < len(_BG_NAMES), -1, colour)[y0:y1, x0:x1]
    mask = comp[y0:y1, x0:x1]
    if pose == "lying":
        colour, mask = np.rot90(colour, k=1), np.rot90(mask, k=1)  # counter-clockwise: back upright
    n = colour.shape[0]
    rows = lambda a, b: colour[int(a * n) : max(int(a * n) + 1, int(b * n))]  # noqa: E731
    return Reading(
        _kind(mask),
        _majority(rows(0.375, 0.625)),
        _majority(rows(0.0, 0.2)),
        _majority(rows(0.8, 1.0)),
        placement,
        size,
        pose,
        light,
    )


def read(image: np.ndarray, count: int = 1) -> tuple[str, list[Reading]]:
    """(background, the ``count`` largest products read left to right); fewer where fewer are drawn."""
    image = np.asarray(image)
    background = read_background(image)
    nearest = _nearest(image)
    bg = _BG_NAMES.index(background)
    comps = [c for c in _components(nearest != bg) if c.sum() >= MIN_PIXELS][:count]
    comps.sort(key=lambda c: np.nonzero(c)[1].mean())
    return background, [_read_product(image, nearest, c) for c in comps]
