"""The study's world is deterministic, and its pixel metrics read its own renders correctly."""

import numpy as np

from study.metrics import READERS, proportion_interval, read_background, read_placement, read_size
from study.world import (
    ATTRIBUTES,
    KINDS,
    Placed,
    Scene,
    caption,
    product_masks,
    random_scene,
    render,
    sample_identities,
    split,
)


def test_identities_are_deterministic_and_split_apart():
    a, b = sample_identities(3, 30), sample_identities(3, 30)
    assert a == b and a != sample_identities(4, 30)
    train, heldout = split(a, heldout=9)
    assert len(train) == 21 and len(heldout) == 9
    assert not {i.index for i in train} & {i.index for i in heldout}
    assert [i.kind for i in heldout].count(KINDS[0]) == 3


def test_render_gives_image_and_mask_of_the_product():
    ident = sample_identities(0, 1)[0]
    image, mask = render(Scene("teal", [Placed(ident, "left", "large")]), size=64)
    assert image.size == mask.size == (64, 64) and image.mode == "RGB" and mask.mode == "L"
    m = np.asarray(mask) > 127
    assert 0.05 < m.mean() < 0.6 and np.nonzero(m)[1].mean() < 32  # on the left half
    assert render(Scene("teal", [Placed(ident, "left", "large")]))[0].tobytes() == image.tobytes()


def test_captions_name_the_class_word_and_the_scene():
    ids = sample_identities(0, 2)
    assert caption(Scene("teal", [Placed(ids[0], "left", "large")])) == (
        "a bottle on the left, large, on a teal background"
    )
    two = Scene("blue", [Placed(ids[0], "left", "small"), Placed(ids[1], "right", "small")])
    assert caption(two) == "a bottle on the left and a box on the right, on a blue background"


def test_described_products_name_their_look_before_the_class_word_and_the_words_spread():
    """The base's training captions may name a product's look, every word before its class word; each word names
    many products, and together they tell almost every held-out product apart."""
    from collections import Counter

    from study.world import BUILD_WORDS, DENSITY_WORDS, HUE_WORDS, INK_WORDS, PATTERN_WORDS, appearance

    ident = sample_identities(0, 1)[0]
    described = Placed(ident, "left", "small", frozenset({"pose"}), described=True)
    words = appearance(ident)
    assert caption(Scene("teal", [described])) == f"a lying {words} bottle on the left, small, on a teal background"
    assert described.flipped().described and words.split()[3] == PATTERN_WORDS[ident.pattern]
    ids = sample_identities(0, 300)
    for k, vocabulary in enumerate([BUILD_WORDS, DENSITY_WORDS, INK_WORDS, PATTERN_WORDS.values(), HUE_WORDS]):
        used = Counter(appearance(i).split()[k] for i in ids)
        assert set(used) == set(vocabulary) and min(used.values()) >= 15  # no word names almost every product
    assert len({(i.kind, appearance(i)) for i in ids[-60:]}) >= 55


def test_metrics_read_every_render_of_the_world():
    """The readings are the ground truth on renders, so a generated image is judged by the scene alone."""
    rng = np.random.default_rng(0)
    ids = sample_identities(1, 90)
    right = {"background": 0, "placement": 0, "size": 0}
    for ident in ids:
        scene = random_scene(rng, ident)
        image, _ = render(scene)
        p = scene.products[0]
        right["background"] += read_background(image) == scene.background
        right["placement"] += read_placement(image) == p.placement
        right["size"] += read_size(image) == p.size
    assert right == {"background": 90, "placement": 90, "size": 90}


def test_attributes_are_said_in_captions_and_read_from_every_render():
    """The readings on 600 renders of random scenes and attributes (fixed before any method is compared): their
    ceilings. Measured: placement 600, size 599, pose 599, cap 600, light 597 (a large lying product at an edge
    is clipped by the frame, a patterned one can fool the light reading)."""
    ids = sample_identities(0, 2)
    lying = Placed(ids[0], "left", "small", frozenset({"pose", "cap", "light"}))
    assert caption(Scene("teal", [lying])) == (
        "a lying bottle with a cap, lit from the left, on the left, small, on a teal background"
    )
    assert lying.flipped().marked == frozenset() and Placed(ids[1], "left", "small").flipped().marked == set(ATTRIBUTES)
    rng = np.random.default_rng(0)
    ids = sample_identities(1, 300)
    right = dict.fromkeys(["placement", "size", *ATTRIBUTES], 0)
    for k in range(600):
        scene = random_scene(rng, ids[k % 300])
        image, _ = render(scene)
        p = scene.products[0]
        right["placement"] += read_placement(image) == p.placement
        right["size"] += read_size(image) == p.size
        for attribute in ATTRIBUTES:
            right[attribute] += READERS[attribute](image) == p.value(attribute)
    assert right == {"placement": 600, "size": 599, "pose": 599, "light": 597, "cap": 600}, right


def test_each_product_has_its_own_mask():
    ids = sample_identities(0, 2)
    scene = Scene("blue", [Placed(ids[0], "left", "small"), Placed(ids[1], "right", "small")])
    left, right = (np.asarray(m) > 127 for m in product_masks(scene))
    assert left.any() and right.any() and not (left & right).any()
    assert np.nonzero(left)[1].mean() < 32 < np.nonzero(right)[1].mean()


def test_metrics_see_no_product_on_a_plain_background():
    image, _ = render(Scene("red", []))
    assert read_background(image) == "red" and read_placement(image) is None and read_size(image) is None


def test_wilson_interval():
    lo, hi = proportion_interval(180, 200)
    assert lo < 0.9 < hi and 0.84 < lo and hi < 0.94
    assert proportion_interval(0, 50)[0] == 0.0 and proportion_interval(0, 0) == (0.0, 1.0)


def test_the_longest_caption_is_one_token_a_word_and_fits_the_base(tmp_path):
    """Two described products with every attribute marked: each word is one token of the base's tokenizer, and
    the caption is not cut (a cut caption loses its background, or a product's placement)."""
    from transformers import CLIPTokenizer

    from study.base import PUNCTUATION, WORDS, BaseConfig, write_tokenizer

    cfg = BaseConfig()
    write_tokenizer(str(tmp_path), WORDS, PUNCTUATION, cfg.max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = sample_identities(0, 300)
    every = frozenset(ATTRIBUTES)

    def told(ident, at: str) -> Placed:
        return Placed(ident, at, "small", every, described=True)

    pairs = [[told(a, "centre"), told(b, "right")] for a, b in zip(ids, ids[1:])]
    longest = max((caption(Scene("purple", pair)) for pair in pairs), key=lambda c: len(c.split()))
    assert [w for w in [*WORDS, *PUNCTUATION] if len(tokenizer.tokenize(w)) != 1] == []
    tokens = tokenizer(longest)["input_ids"]
    assert len(tokens) == len(longest.replace(",", " ,").split()) + 2  # every word one token, plus BOS and EOS
    assert len(tokens) <= cfg.max_tokens
