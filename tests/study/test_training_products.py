"""The encoders' training products (round 5): half the base drew most often, half new to it, kinds balanced."""

import json
import os
from dataclasses import replace

from study import base, encoders, world

QUICK = base.QUICK  # 40 products of its own, 96 renders


def _train_ids():
    return world.split(world.sample_identities(0, 30), 6)[0]  # the quick scale's 24 train identities


def test_the_scenes_drawn_are_the_scenes_rendered():
    own = base.own_products(QUICK, _train_ids())
    scenes = base.training_scenes(own, 12, seed=3, described=0.5)
    renders = base.render_set(scenes, 32)
    assert renders.captions == [world.caption(s) for s in scenes]
    assert renders.kinds == [[p.identity.kind for p in s.products] for s in scenes]
    counts = base.renders_per_product(QUICK, _train_ids())
    assert sum(counts.values()) == sum(len(s.products) for s in base.base_scenes(QUICK, _train_ids()))


def test_the_base_draws_its_familiar_products_more_and_share_zero_draws_as_before():
    """Round 6: the first familiar_per_kind own products of each kind lead familiar_share of the renders; share 0
    (what a record from before the field means) draws the scenes the round-5 code drew."""
    cfg = replace(QUICK, images=600)  # scenes only, never rendered: enough to part the two groups
    train, own = _train_ids(), base.own_products(cfg, _train_ids())
    familiar = base.familiar_products(cfg, train)
    assert [sum(i.kind == k for i in familiar) for k in world.KINDS] == [4] * len(world.KINDS)
    assert all(i in own for i in familiar)
    counts = base.renders_per_product(cfg, train)
    mine = [counts.get(i.index, 0) for i in familiar]
    others = [n for i, n in counts.items() if own[i] not in familiar]
    assert min(mine) > max(others)  # 60% of the renders lead with one of 12 products of 40
    products = encoders.training_products(train, cfg, 0.5)
    assert sorted(encoders.drawn_by_base(products), key=lambda i: i.index) == sorted(familiar, key=lambda i: i.index)
    off = base.BaseConfig.from_record({**base.asdict(QUICK), "familiar_share": 0.0})
    record = {k: v for k, v in base.asdict(QUICK).items() if k != "familiar_share"}
    assert base.BaseConfig.from_record(record) == off
    plain = base.training_scenes(own, 96, QUICK.seed, QUICK.described)
    assert base.base_scenes(off, train) == plain != base.base_scenes(QUICK, train)


def test_half_the_products_are_ones_the_base_drew_and_half_are_train_identities():
    train = _train_ids()
    products = encoders.training_products(train, QUICK, 0.5)
    drawn, own = base.renders_per_product(QUICK, train), base.own_products(QUICK, train)
    assert len(products) == len(train) == 24
    mine = {n: i for n, i in products.items() if i in encoders.drawn_by_base(products)}
    assert len(mine) == 12 and all(own[i.index] == i and i.index in drawn for i in mine.values())
    assert [i for i in products.values() if i not in mine.values()] == train[:12]
    for kind in world.KINDS:
        assert sum(i.kind == kind for i in mine.values()) == 4
        chosen = [drawn[i.index] for i in mine.values() if i.kind == kind]
        left = [n for i, n in drawn.items() if own[i].kind == kind and own[i] not in mine.values()]
        assert min(chosen) >= max(left)  # the ones the base drew most often
        assert sum(i.kind == kind for i in products.values()) == 8
    study = {(i.body, i.ink) for i in world.sample_identities(0, 30)}
    assert not any((i.body, i.ink) in study for i in mine.values())  # the base's own are none of the study's


def test_share_zero_is_round_four_and_a_base_of_train_identities_is_round_three():
    train = _train_ids()
    assert list(encoders.training_products(train, QUICK, 0.0).values()) == train
    round3 = base.BaseConfig(products=0, images=96)
    assert list(encoders.training_products(train, round3, 0.5).values()) == train
    assert base.familiar_products(round3, train) == [] and len(base.base_scenes(round3, train)) == 96


def test_two_product_rows_name_each_product_by_its_subject(tmp_path):
    train = _train_ids()
    products = encoders.training_products(train, QUICK, 0.5)
    cfg = encoders.EncoderConfig(scenes_per_identity=1, pair_share=0.5)
    photos = encoders.write_photos(str(tmp_path / "p"), str(tmp_path / "m"), products, cfg, 32, seed=1)
    assert sorted(d for d in os.listdir(photos) if os.path.isdir(os.path.join(photos, d))) == sorted(products)
    pairs = [json.load(open(os.path.join(photos, f))) for f in os.listdir(photos) if f.endswith(".json")]
    assert len(pairs) == 24
    for pair in pairs:
        assert len(pair["subjects"]) == 2
        for kind, name in pair["subjects"].items():
            assert products[name].kind == kind
