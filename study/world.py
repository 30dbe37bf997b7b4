"""The miniature product world: procedural products ("identities") rendered into named scenes.

    ids = sample_identities(seed=0, count=60)          # deterministic; ids[i].kind in KINDS
    train, heldout = split(ids, heldout=20)
    scene = Scene("teal", [Placed(ids[0], "left", "large")])
    image, mask = render(scene)                        # PIL RGB (size x size), PIL L mask of the products
    caption(scene)                                     # "a bottle on the left, large, on a teal background"
    lying = Placed(ids[0], "left", "small", marked=frozenset({"pose", "cap"}))
    caption(Scene("teal", [lying]))                    # "a lying bottle with a cap on the left, small, ..."

An identity is one product: its kind's class word, a shape variant, a continuous body colour and a
label pattern (stripes, dots, checks or a band) with its own colour and frequency. Only the base's
training captions may name its look (a described product: "a slim fine azure striped amber bottle", one of
768 looks per kind); the prompts a subject is tested with never do, so an identity can only come from a reference
photo. A scene names what the
prompt can say: a background colour, and per product a placement, a size and three attributes that act
on the product itself (ATTRIBUTES): its pose, the side its light comes from and a white cap. Each is
binary; the default value goes unsaid, the marked one is said. They are what a reference photo can
contradict, so the identity-prompt trade-off can appear.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

KINDS = ("bottle", "box", "mug")
PATTERNS = ("stripes", "dots", "checks", "band")
BACKGROUNDS = {  # name -> RGB; far apart, and each pixel's nearest name is the metric's reading
    "red": (200, 40, 40),
    "yellow": (225, 200, 40),
    "green": (50, 160, 60),
    "teal": (30, 150, 150),
    "blue": (40, 70, 200),
    "purple": (130, 50, 170),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
PLACEMENTS = {"left": 0.25, "centre": 0.5, "right": 0.75}  # horizontal centre, as a fraction of the width
SIZES = {"small": 0.42, "large": 0.72}  # product height, as a fraction of the image height
ATTRIBUTES = {  # name -> (default value, marked value, the caption's words for the marked value)
    "pose": ("standing", "lying", "lying"),  # lying: turned 90 degrees, its top to the left
    "light": ("right", "left", "lit from the left"),  # the side the shading's light comes from
    "cap": ("bare", "cap", "with a cap"),  # a white cap over the top of the product
}
LYING_LENGTH = 0.7  # a lying product's length, as a fraction of its standing height (it fits the placements)
CAP = (250, 250, 250)  # RGB; never a body, ink or background colour (those are saturated or dark)
CAP_DEPTH = 0.18  # fraction of the product's height, from its top
SHADE = (0.7, 1.1)  # the shading from the far side to the lit side
SUPERSAMPLE = 4  # drawn at 4x then box-filtered, so edges and patterns are anti-aliased
# Appearance words: what a base's training captions say of a described product, every word before its class
# word so that a causal text encoder folds them into the class word's state, as in real models: its build, its
# pattern's density, its ink's hue, its pattern and its body's hue ("a slim fine azure striped amber bottle").
# Only the base's training captions use them (a share of its products are described); the prompts of the
# evaluation and of encoder training never do, so identity still comes from the reference alone. Together they
# name 768 looks per kind; a product's exact colours, its shape variant and its pattern's phase go unsaid.
PATTERN_WORDS = {"stripes": "striped", "dots": "dotted", "checks": "checked", "band": "banded"}
# Hue words and each one's upper hue in degrees. Most bodies are orange to yellow (far from every background),
# so the first edges are the sextiles of the world's body hues (seed 0, 300 identities: 41.0, 47.6, 53.2, 61.5).
HUE_WORDS = {"orange": 41.0, "amber": 47.6, "gold": 53.2, "mustard": 61.5, "lemon": 180.0, "pink": 360.0}
# Inks take any hue: eight sectors of 45 degrees, the first centred on red, named apart from the backgrounds.
INK_WORDS = ("crimson", "tangerine", "lime", "jade", "aqua", "azure", "violet", "magenta")
BUILD_WORDS = ("slim", "stout")  # aspect below / above the middle of its range (0.5-0.85)
DENSITY_WORDS = ("broad", "fine")  # pattern frequency below / above the middle of its range (2-5)


@dataclass(frozen=True)
class Identity:
    index: int
    kind: str
    aspect: float  # width / height of the product (a mug's includes its handle)
    variant: float  # kind-specific shape knob in [0, 1]: neck length, lid depth, handle size
    body: tuple[float, float, float]  # RGB in [0, 1]
    pattern: str
    ink: tuple[float, float, float]  # the pattern's colour
    frequency: float  # repeats across the body
    phase: float  # in [0, 1)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(item: dict) -> "Identity":
        return Identity(**{**item, "body": tuple(item["body"]), "ink": tuple(item["ink"])})


@dataclass(frozen=True)
class Placed:
    identity: Identity
    placement: str
    size: str
    marked: frozenset = frozenset()  # the ATTRIBUTES that take their marked value
    described: bool = False  # the caption names its look, world.appearance (the base's training captions only)

    def value(self, attribute: str) -> str:
        default, marked, _ = ATTRIBUTES[attribute]
        return marked if attribute in self.marked else default

    def describe(self) -> str:
        """The kind with its marked attributes' words: "lying bottle with a cap, lit from the left,"; described:
        "lying slim fine azure striped amber bottle ..."."""
        words = ("lying " if "pose" in self.marked else "") + (
            appearance(self.identity) + " " if self.described else ""
        )
        words += self.identity.kind
        words += " with a cap" if "cap" in self.marked else ""
        return words + (", lit from the left," if "light" in self.marked else "")

    def flipped(self) -> "Placed":
        """The same product with every attribute at its other value: how a reference contradicts a prompt."""
        return Placed(self.identity, self.placement, self.size, frozenset(ATTRIBUTES) - self.marked, self.described)


@dataclass(frozen=True)
class Scene:
    background: str
    products: list[Placed] = field(default_factory=list)


def told(scene: Scene) -> Scene:
    """The scene with every product's look named in its caption, as in a share of the base's training captions."""
    return Scene(scene.background, [replace(p, described=True) for p in scene.products])


def appearance(identity: Identity) -> str:
    """The words for its look, before its class word: "slim fine azure striped amber"."""

    def hue(rgb) -> float:
        return colorsys.rgb_to_hsv(*rgb)[0] * 360

    body = next(w for w, top in HUE_WORDS.items() if hue(identity.body) < top)
    ink = INK_WORDS[int((hue(identity.ink) + 22.5) % 360 // 45)]
    build = BUILD_WORDS[identity.aspect >= 0.675]
    density = DENSITY_WORDS[identity.frequency >= 3.5]
    return f"{build} {density} {ink} {PATTERN_WORDS[identity.pattern]} {body}"


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    # saturated or light/dark, never a background's exact hue: any hue, saturation 0.35-1, value 0.45-1
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h, s, v))


def _stands_out(body: tuple[float, float, float]) -> bool:
    """A body colour far from every background at every shade, so the product never melts into the scene."""
    palette = np.array(list(BACKGROUNDS.values()), np.float32)
    shades = np.array([SHADE[0], 0.9, SHADE[1]])[:, None] * np.array(body) * 255
    return bool(np.linalg.norm(np.clip(shades, 0, 255)[:, None] - palette[None], axis=-1).min() > 80)


def sample_identities(seed: int, count: int) -> list[Identity]:
    """`count` identities, kinds in turn (bottle, box, mug, bottle, ...), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        body = _colour(rng)
        while not _stands_out(body):
            body = _colour(rng)
        ink = _colour(rng)
        while np.abs(np.subtract(body, ink)).sum() < 0.6:  # the pattern must be visible on the body
            ink = _colour(rng)
        out.append(
            Identity(
                index=i,
                kind=KINDS[i % len(KINDS)],
                aspect=round(float(rng.uniform(0.5, 0.85)), 4),  # standing: narrower than tall, lying: wider
                variant=round(float(rng.uniform(0, 1)), 4),
                body=body,
                pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
                ink=ink,
                frequency=round(float(rng.uniform(2.0, 5.0)), 4),
                phase=round(float(rng.uniform(0, 1)), 4),
            )
        )
    return out


def split(identities: list[Identity], heldout: int) -> tuple[list[Identity], list[Identity]]:
    """The last `heldout` identities are held out (kinds stay balanced when `heldout` is a multiple of 3)."""
    return identities[:-heldout], identities[-heldout:]


def caption(scene: Scene) -> str:
    """One product: "a mug on the right, small, on a red background"; two: sizes are left out (both small)."""
    if len(scene.products) == 1:
        p = scene.products[0]
        return f"a {p.describe()} on the {p.placement}, {p.size}, on a {scene.background} background"
    parts = [f"a {p.describe()} on the {p.placement}" for p in scene.products]
    return " and ".join(parts) + f", on a {scene.background} background"


def _silhouette(ident: Identity, h: int, w: int) -> np.ndarray:
    """(h, w) bool of the product drawn in its own box; the body is the lower part for a bottle."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w, (y + 0.5) / h  # in [0, 1]
    if ident.kind == "bottle":
        neck = 0.2 + 0.2 * ident.variant  # neck height fraction
        body = (v > neck + 0.08) & (np.abs(u - 0.5) < 0.5)
        shoulder = (v > neck) & (v <= neck + 0.08) & (np.abs(u - 0.5) < 0.5 * (v - neck) / 0.08 + 0.15)
        neck_part = (v <= neck) & (np.abs(u - 0.5) < 0.15)
        return body | shoulder | neck_part
    if ident.kind == "box":
        lid = 0.08 + 0.12 * ident.variant
        return (v > lid) | ((np.abs(u - 0.5) < 0.45) & (v > 0.02))
    # mug: a body on the left 75% and a ring handle on the right
    body = u < 0.75
    r_out = 0.12 + 0.1 * ident.variant
    d = np.hypot((u - 0.75) * w / h, v - 0.5)
    handle = (u >= 0.75) & (d < r_out) & (d > r_out * 0.55)
    return body | handle


def _pattern(ident: Identity, h: int, w: int) -> np.ndarray:
    """(h, w) bool: where the label's ink goes, in the product's own box."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w, (y + 0.5) / h
    f, p = ident.frequency, ident.phase
    if ident.pattern == "stripes":
        return np.sin(2 * np.pi * (v * f + p)) > 0.2
    if ident.pattern == "checks":
        return (np.floor(u * f + p) + np.floor(v * f + p)) % 2 == 0
    if ident.pattern == "dots":
        cu, cv = (u * f + p) % 1 - 0.5, (v * f + p) % 1 - 0.5
        return np.hypot(cu, cv) < 0.28
    centre = 0.35 + 0.3 * p  # band: one wide horizontal band whose width follows the frequency
    return np.abs(v - centre) < 0.5 / f


def _product(placed: Placed, H: int) -> tuple[np.ndarray, np.ndarray]:
    """The product in its own box as it stands in the scene: (h, w) bool silhouette and (h, w, 3) colour."""
    ident = placed.identity
    lying = placed.value("pose") == "lying"
    h = int(round(SIZES[placed.size] * H * (LYING_LENGTH if lying else 1.0)))  # along the product's own axis
    w = int(round(h * ident.aspect))
    shape = _silhouette(ident, h, w)
    colour = np.where(_pattern(ident, h, w)[..., None], np.array(ident.ink), np.array(ident.body))
    cap = np.zeros((h, w), bool)
    if placed.value("cap") == "cap":
        cap[: int(round(CAP_DEPTH * h))] = True
    if lying:  # its top to the left
        shape, colour, cap = np.rot90(shape), np.rot90(colour), np.rot90(cap)
    # shading across the scene's x axis, brighter toward the light, so the product reads as a solid
    ramp = np.linspace(*SHADE, shape.shape[1])
    ramp = ramp[::-1] if placed.value("light") == "left" else ramp
    colour = np.clip(colour * ramp[None, :, None], 0, 1)
    colour[cap] = np.array(CAP) / 255  # unshaded: the metrics find the cap by its colour
    return shape, colour


def _draw(canvas: np.ndarray, mask: np.ndarray, placed: Placed) -> None:
    """Draws one product into canvas (H, W, 3) float and mask (H, W) float, both at supersampled size."""
    H, W = mask.shape
    shape, colour = _product(placed, H)
    h, w = shape.shape
    cx = PLACEMENTS[placed.placement] * W
    top = int(round(0.92 * H)) - h  # products stand on a common floor line
    left = int(round(cx - w / 2))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, H), min(left + w, W)
    sub = shape[y0 - top : y1 - top, x0 - left : x1 - left]
    canvas[y0:y1, x0:x1][sub] = colour[y0 - top : y1 - top, x0 - left : x1 - left][sub]
    mask[y0:y1, x0:x1][sub] = 1.0


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """The scene as an RGB image and the products' mask (L, 255 = product), both size x size."""
    S = size * SUPERSAMPLE
    canvas = np.empty((S, S, 3), np.float32)
    canvas[:] = np.array(BACKGROUNDS[scene.background], np.float32) / 255
    mask = np.zeros((S, S), np.float32)
    for placed in scene.products:
        _draw(canvas, mask, placed)
    image = Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((size, size), Image.BOX)
    return image, Image.fromarray((mask * 255).round().astype(np.uint8)).resize((size, size), Image.BOX)


def product_masks(scene: Scene, size: int = 64) -> list[Image.Image]:
    """Each product's own mask (L, 255 = product), in the scene's order: where its class word should attend."""
    return [render(Scene(scene.background, [p]), size)[1] for p in scene.products]


def random_marked(rng: np.random.Generator, share: float = 0.5) -> frozenset:
    """Each attribute marked independently with probability ``share``."""
    return frozenset(a for a in ATTRIBUTES if rng.random() < share)


def random_scene(
    rng: np.random.Generator, identity: Identity, second: Identity | None = None, attributes: bool = True
) -> Scene:
    """A random background, placement, size and attributes for `identity` (and `second`, placed apart from it);
    ``attributes=False`` keeps every attribute at its default."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    if second is None:
        placement = list(PLACEMENTS)[int(rng.integers(len(PLACEMENTS)))]
        size = list(SIZES)[int(rng.integers(2))]
        marked = random_marked(rng) if attributes else frozenset()
        return Scene(background, [Placed(identity, placement, size, marked)])
    order = ("left", "right") if rng.integers(2) == 0 else ("right", "left")
    marks = [random_marked(rng) if attributes else frozenset() for _ in range(2)]
    return Scene(
        background,
        [Placed(identity, order[0], "small", marks[0]), Placed(second, order[1], "small", marks[1])],
    )
