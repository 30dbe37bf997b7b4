"""The round-9 world: discrete products, held-out combinations, captions, and the rule reader (R0's ground)."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

from study import base, evaluate, world


def test_products_are_every_combination_with_bands_unlike_the_body():
    products = world.all_products()
    assert len(products) == 3 * 6 * 5 * 5 == len(set(products))
    assert all(p.top != p.body and p.bottom != p.body for p in products)


def test_heldout_products_are_unseen_combinations_of_values_seen_in_pairs():
    train, held = world.split(world.all_products(), 90, seed=0)
    assert len(held) == 90 and not set(train) & set(held)
    assert world.split(world.all_products(), 90, seed=0) == (train, held)  # deterministic
    for p in held:
        for a, b in itertools.combinations(world.PARTS, 2):
            assert any(getattr(q, a) == getattr(p, a) and getattr(q, b) == getattr(p, b) for q in train), (p, a, b)


def test_the_reader_reads_every_product_in_random_scenes_exactly():
    rng = np.random.default_rng(1)
    for product in world.all_products():
        scene = world.random_scene(rng, product)
        row = evaluate.score(scene, world.render(scene, rng))
        assert all(row.values()), (scene, row)


def test_every_scene_and_attribute_value_is_read():
    product = world.Product("mug", "red", "blue", "cyan")
    values = (world.BACKGROUNDS, world.PLACEMENTS, world.SIZES, world.POSES, world.LIGHTS)
    for bg, place, size, pose, light in itertools.product(*values):
        scene = world.Scene(bg, [world.Placed(product, place, size, pose, light)])
        assert all(evaluate.score(scene, world.render(scene)).values()), scene


def test_the_reader_is_not_lenient_another_product_reads_wrong():
    rng = np.random.default_rng(2)
    products = world.all_products()
    wrong = 0
    for k in range(100):
        scene = world.random_scene(rng, products[k])
        other = world.Scene(scene.background, [replace(scene.products[0], product=products[-1 - k])])
        wrong += evaluate.score(scene, world.render(other))["identity"] == 0
    assert wrong == 100


def test_a_blank_image_reads_no_product_and_scores_zero():
    scene = world.random_scene(np.random.default_rng(3), world.all_products()[0])
    blank = world.render(world.Scene(scene.background, []))
    row = evaluate.score(scene, blank)
    assert row["background"] == 1 and row["identity"] == 0 and row["placement"] == 0


def test_two_products_are_read_left_to_right():
    a, b = world.Product("bottle", "red", "blue", "green"), world.Product("box", "cyan", "yellow", "magenta")
    for seed in range(20):
        scene = world.random_scene(np.random.default_rng(seed), a, b)
        _, seen = world.read(world.render(scene, np.random.default_rng(seed)), count=2)
        assert [r.product() for r in seen] == [a, b]


def test_a_reference_shows_pose_and_light_at_their_other_value():
    placed = world.Placed(world.all_products()[0], "left", "large", "upright", "left")
    assert (placed.flipped().pose, placed.flipped().light) == ("lying", "right")
    assert placed.flipped().flipped() == placed


def test_captions_name_the_look_before_the_class_word_only_when_described():
    scene = world.Scene("grey", [world.Placed(world.Product("bottle", "red", "blue", "green"), "left", "large")])
    assert world.caption(scene) == "upright lit left bottle on grey left large"
    described = "upright lit left red blue top green bottom bottle on grey left large"
    assert world.caption(scene, described=True) == described


def test_every_word_is_one_token_and_the_longest_caption_fits(tmp_path):
    from transformers import CLIPTokenizer

    base.write_tokenizer(str(tmp_path), world.words(), base.MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in world.words():
        assert len(tok(word).input_ids) == 3, word
    a, b = world.Product("bottle", "magenta", "yellow", "yellow"), world.Product("mug", "yellow", "magenta", "cyan")
    longest = world.caption(world.random_scene(np.random.default_rng(0), a, b), described=True)
    assert len(tok(longest).input_ids) <= base.MAX_TOKENS


@pytest.mark.parametrize("k", [0, 1])
def test_training_masks_cover_each_product(k):
    rng = np.random.default_rng(k)
    a, b = world.all_products()[0], world.all_products()[-1]
    scene = world.random_scene(rng, a, b if k else None)
    masks = base._masks(scene, world.render(scene, rng))
    assert masks[0].sum() > 4 and (masks[1].sum() > 4) == bool(k)
    assert masks.max() <= 1
