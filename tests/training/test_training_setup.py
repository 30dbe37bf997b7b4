"""What the trainer trains on (issue 17): the base's latent convention, timestep bias, the LR schedule and EMA
warm-up, references padded and drawn from another photo of the subject, and rows of two subjects."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_diffusers import make_base, make_clip_vision

from na_engine.errors import NestedAttentionError
from na_engine.standalone import train as trainer
from na_engine.standalone import train_data
from na_engine.standalone.prepare import prepare
from na_engine.standalone.references import augment, pad_square, subject_box
from na_engine.standalone.train import TrainConfig


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"base": "b", "clip_vision": "v", "data": "d", "out": "o.safetensors", **kw})


# -- latents ---------------------------------------------------------------------------------


def test_the_study_base_and_the_trainer_agree_on_posterior_means(tmp_path):
    """The study's base trains its UNet on the VAE posterior's mean and records it; the trainer reads that record
    and trains on the mean too. A base without a record (SD1.5, SDXL) trains on a sample, as it was made."""
    from dataclasses import replace

    from transformers import CLIPTokenizer

    from study import base as study_base
    from study import config, world

    cfg = replace(config.QUICK, ae_steps=1)
    images = torch.rand(4, 3, world.RESOLUTION, world.RESOLUTION) * 2 - 1
    vae = study_base.train_autoencoder(cfg, images, print)
    latents = study_base.latent_means(vae, images) * vae.config.scaling_factor  # what the study's base trains on
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    torch.testing.assert_close(latents, posterior.mean * vae.config.scaling_factor)
    folder = tmp_path / "study_base"
    tok = tmp_path / "tok"
    study_base.write_tokenizer(str(tok), world.words(), study_base.MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok))
    text, unet = study_base.make_text_encoder(cfg, tokenizer), study_base.make_unet(cfg)
    study_base.save_pipeline(str(folder), vae, text, unet)
    chosen = trainer.latent_convention(_cfg(base=str(folder)))
    assert chosen == "mean"
    eps = torch.randn_like(posterior.mean)
    torch.testing.assert_close(trainer.training_latents(posterior, eps, chosen == "sample", vae), latents)
    sampled = trainer.training_latents(posterior, eps, True, vae)
    torch.testing.assert_close(sampled, (posterior.mean + posterior.std * eps) * vae.config.scaling_factor)
    assert trainer.latent_convention(_cfg(base=make_base(str(tmp_path / "tiny")))) == "sample"
    assert trainer.latent_convention(_cfg(base=str(folder), latents="sample")) == "sample"


# -- timesteps, learning rate, EMA -----------------------------------------------------------


def test_timestep_bias_favours_the_noisy_end():
    later = train_data.timestep_weights(_cfg(timestep_bias="later"), 1000)  # portion 0.4, x3
    assert train_data.timestep_weights(_cfg(), 1000) is None
    assert later[999] == pytest.approx(3 * later[0]) and later[600] == later[999] and later[599] == later[0]
    assert float(later.sum()) == pytest.approx(1.0)
    earlier = train_data.timestep_weights(_cfg(timestep_bias="earlier", timestep_bias_multiplier=5), 1000)
    assert earlier[0] == pytest.approx(5 * earlier[999])
    draws = train_data.RowDraws.draw(_cfg(timestep_bias="later"), 0, range(2000), (4, 2, 2), 1000).timesteps
    share = float((draws >= 600).float().mean())  # expected 0.4 * 3 / (0.6 + 0.4 * 3) = 2/3
    assert 0.62 < share < 0.71, share
    uniform = train_data.RowDraws.draw(_cfg(), 0, range(2000), (4, 2, 2), 1000).timesteps
    assert 0.36 < float((uniform >= 600).float().mean()) < 0.44


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = _cfg(steps=100, warmup=10)
    factors = [trainer.lr_factor(cfg, s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert {trainer.lr_factor(_cfg(steps=100, lr_schedule="constant"), s) for s in range(100)} == {1.0}


def test_ema_warms_up_so_early_weights_fade():
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = trainer.EMA(module, 0.999)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module, 1)  # decay min(0.999, 2 / 11)
    assert float(ema.shadow["weight"]) == pytest.approx(9 / 11)


# -- references ------------------------------------------------------------------------------


def _tall_subject() -> Image.Image:
    image = Image.new("RGB", (20, 60), (255, 255, 255))
    image.paste((200, 20, 20), (5, 0, 15, 60))  # a red bar from the top row to the bottom one
    return image


def test_references_are_padded_never_cropped():
    tall = _tall_subject()
    square = pad_square(tall)
    assert square.size == (60, 60) and pad_square(square) is square
    red = lambda im: int((np.asarray(im)[..., 0] > 150).sum() - (np.asarray(im)[..., 1] > 150).sum())  # noqa: E731
    assert red(square) == red(tall) == 600
    for seed in range(5):
        out = augment(tall, random.Random(seed))
        assert out.width == out.height >= 60
        a = np.asarray(out).astype(int)
        bar = (a[..., 0] - a[..., 1]) > 80
        assert bar.any(axis=1).sum() == 60, seed  # every row of the bar is still there


def _photo(path, colour, size=32):
    image = Image.new("RGB", (size, size), (10, 10, 10))
    image.paste(colour, (8, 8, 24, 24))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (8, 8, 24, 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return mask


@pytest.fixture()
def grouped(tmp_path):
    """Two subjects with two photos each (a subfolder each), and one photo of both."""
    src, masks = tmp_path / "src", tmp_path / "masks"
    for subject, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        for k in range(2):
            mask = _photo(src / subject / f"{k}.png", colour)
            (src / subject / f"{k}.txt").write_text(f"a {'dog' if subject == 'red' else 'cat'} on the grass")
            (masks / subject).mkdir(parents=True, exist_ok=True)
            mask.save(masks / subject / f"{k}.png")
    both = Image.new("RGB", (32, 32), (10, 10, 10))
    both.paste((220, 20, 20), (0, 8, 14, 24))
    both.paste((20, 20, 220), (18, 8, 32, 24))
    both.save(src / "pair.png")
    (src / "pair.txt").write_text("a dog and a cat")
    (src / "pair.json").write_text(json.dumps({"subjects": {"dog": "red", "cat": "blue"}}))
    for word, box in (("dog", (0, 8, 14, 24)), ("cat", (18, 8, 32, 24))):
        m = Image.new("L", (32, 32), 0)
        m.paste(255, box)
        m.save(masks / f"pair.{word}.png")
    out = tmp_path / "prepared"
    record = prepare(str(src), str(out), ["dog", "cat"], resolution=32, keep_captions=True, masks=str(masks))
    return out, record


def test_prepare_groups_a_subfolders_photos_and_names_each_subject_of_a_pair(grouped):
    out, record = grouped
    assert record["items"] == ["blue__0", "blue__1", "pair", "red__0", "red__1"]
    assert record["subjects"][2] == [
        {"trigger": "dog", "group": "red", "mask": "pair.dog.mask.png"},
        {"trigger": "cat", "group": "blue", "mask": "pair.cat.mask.png"},
    ]
    assert record["subjects"][3] == [{"trigger": "dog", "group": "red", "mask": "red__0.mask.png"}]
    assert (out / "pair.cat.mask.png").is_file() and (out / "red__1.mask.png").is_file()


def test_a_reference_is_another_photo_of_the_subject(grouped):
    out, _ = grouped

    class Processor:  # keeps the PIL references for the test to read
        def __call__(self, images, return_tensors):
            self.images = images
            return type("P", (), {"pixel_values": torch.zeros(len(images), 3, 8, 8)})

    processor = Processor()
    data = train_data.TrainSet(str(out), 32, processor, seed=0, other_photo=1.0)
    item = data[(0, 0, data.items.index("red__0"))]
    assert item["triggers"] == ["dog"]
    other = subject_box(data.image(data.items.index("red__1")), data.mask(4, data.subjects[4][0]))
    assert data.reference(3, data.image(3), data.subjects[3][0], random.Random(0)).tobytes() == other.tobytes()
    pair = data[(0, 1, data.items.index("pair"))]
    assert pair["triggers"] == ["dog", "cat"] and pair["references"].shape[0] == 2
    reds = [np.asarray(im).reshape(-1, 3).mean(0) for im in processor.images]
    assert reds[0][0] > reds[0][2] and reds[1][2] > reds[1][0]  # the dog's reference is red, the cat's blue
    white = train_data.TrainSet(str(out), 32, processor, seed=0, other_photo=1.0, white=True)
    masked = subject_box(white.image(4), white.mask(4, white.subjects[4][0]), white=True)
    assert white.reference(3, white.image(3), white.subjects[3][0], random.Random(0)).tobytes() == masked.tobytes()
    assert masked.tobytes() != other.tobytes()  # the photo's background did go white
    alone = train_data.TrainSet(str(out), 32, processor, seed=0, other_photo=0.0)
    own = alone.reference(3, alone.image(3), alone.subjects[3][0], random.Random(0))
    assert own.tobytes() == subject_box(alone.image(3), alone.mask(3, alone.subjects[3][0]), white=True).tobytes()


def test_each_subject_of_a_row_binds_only_its_own_word():
    """Two subjects in row 1 and one in row 0: each placement's (B, T) mask is its own row's own positions."""
    from contextlib import contextmanager

    seen = []

    class Processors:
        @contextmanager
        def bound(self, call):
            seen.extend(call.placements)
            yield

    class Unet(torch.nn.Module):
        def forward(self, noisy, t, encoder_hidden_states, added_cond_kwargs):
            return type("Out", (), {"sample": noisy})

    adapter = type("A", (torch.nn.Module,), {})()
    adapter.resampler = torch.nn.Identity()
    model = trainer.NestedDenoiser.__new__(trainer.NestedDenoiser)
    torch.nn.Module.__init__(model)
    model.adapter, model.trigger, model.mode, model.trigger_weight = adapter, "x", "nested", 1.0
    model.__dict__["unet"], model.__dict__["processors"] = Unet(), Processors()
    where = torch.zeros(3, 6, dtype=torch.bool)
    where[0, 2] = where[1, 1] = where[2, 4] = True
    rows = torch.tensor([0, 1, 1])
    model(torch.zeros(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, 6, 8), None, torch.randn(3, 5, 8), where, rows)
    masks = [p.where for p in seen]
    assert [m.nonzero().tolist() for m in masks] == [[[0, 2]], [[1, 1]], [[1, 4]]]


def test_prepare_refuses_pairs_without_names_and_photos_that_would_collide(tmp_path):
    src = tmp_path / "src"
    _photo(src / "pair.png", (200, 20, 20))
    (src / "pair.txt").write_text("a dog and a cat")
    with pytest.raises(NestedAttentionError, match=r"pair\.json"):
        prepare(str(src), str(tmp_path / "o1"), ["dog", "cat"], keep_captions=True)
    (src / "pair.json").write_text("{}")
    with pytest.raises(NestedAttentionError, match=r"must name the subject each shows"):
        prepare(str(src), str(tmp_path / "o2"), ["dog", "cat"], keep_captions=True)
    clash = tmp_path / "clash"
    _photo(clash / "item.png", (1, 2, 3))
    _photo(clash / "item.jpg", (1, 2, 3))
    with pytest.raises(NestedAttentionError, match=r"differ only in their extension.*item\.jpg and .*item\.png"):
        prepare(str(clash), str(tmp_path / "o3"), "dog")


def test_two_subject_rows_train(grouped, tmp_path):
    """A run over photos of one and two subjects, from other-photo references, with the schedule's options."""
    out, _ = grouped
    cfg = TrainConfig(
        base=make_base(str(tmp_path / "base")),
        clip_vision=make_clip_vision(str(tmp_path / "vision")),
        data=str(out),
        out=str(tmp_path / "pairs.safetensors"),
        steps=3,
        batch_size=3,
        tokens=4,
        resampler_depth=1,
        timestep_bias="later",
        caption_dropout=0.0,
        subject_dropout=0.0,
    )
    trainer.train(cfg)
    with open(f"{cfg.run_dir}/loss.csv") as f:
        rows = f.read().splitlines()[1:]
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows)


def test_a_set_prepared_before_grouping_trains_without_masks(tmp_path):
    """A dataset.json without "subjects" (prepared by an earlier version, no --masks): each item is its own
    subject, and the mask its record implies but never wrote is read as none."""
    from tiny_diffusers import make_photos

    out = tmp_path / "old"
    record = prepare(make_photos(str(tmp_path / "src"), count=2), str(out), "dog", resolution=16)
    del record["subjects"]
    (out / "dataset.json").write_text(json.dumps(record))
    data = train_data.TrainSet(str(out), 16, lambda images, return_tensors: None, seed=0)
    assert data.subjects[0] == [{"trigger": "dog", "group": "photo_0", "mask": "photo_0.mask.png"}]
    assert data.mask(0, data.subjects[0][0]) is None
    reference = data.reference(0, data.image(0), data.subjects[0][0], random.Random(0))
    assert reference.size == data.image(0).size  # no mask: the whole photo is the subject


# -- the loss inside the subjects --------------------------------------------------------------


def test_subject_weights_count_a_subjects_latents_more():
    """A mask over the left half of a 32 px row, weight 3: its latents weigh 3, the others 1, a latent half
    covered 2; an error only inside the subject gives 3 n_in / (3 n_in + n_out) of the loss."""
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :, :16] = 1  # row 0: the left half; row 1: no subject
    mask[1, :, :, :4] = 1  # row 1: half of the first latent column (8 px latents)
    weights = trainer.subject_weights(mask, torch.Size((2, 4, 4, 4)), 3.0)
    assert weights.shape == (2, 4, 4, 4)
    assert torch.equal(weights[0, :, :, :2], torch.full((4, 4, 2), 3.0))
    assert torch.equal(weights[0, :, :, 2:], torch.ones(4, 4, 2))
    assert torch.equal(weights[1, :, :, 0], torch.full((4, 4), 2.0)) and torch.equal(
        weights[1, :, :, 1:], torch.ones(4, 4, 3)
    )
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    plain = trainer.subject_weights(mask, torch.Size((2, 4, 4, 4)), 1.0)
    torch.testing.assert_close(trainer.weighted_mse(pred, target, plain), torch.nn.functional.mse_loss(pred, target))
    error = torch.zeros(2, 4, 4, 4)
    error[0, :, :, :2] = 1  # wrong inside row 0's subject only
    assert float(trainer.weighted_mse(error, torch.zeros_like(error), weights)) == pytest.approx(
        3 * 32 / float(weights.sum())
    )


def test_a_row_carries_the_union_of_its_subjects_masks(grouped):
    out, _ = grouped

    class Processor:
        def __call__(self, images, return_tensors):
            return type("P", (), {"pixel_values": torch.zeros(len(images), 3, 8, 8)})

    data = train_data.TrainSet(str(out), 32, Processor(), seed=0, masks=True)
    pair = data[(0, 0, data.items.index("pair"))]["mask"]  # the dog at columns 0..13, the cat at 18..31
    assert pair.shape == (1, 32, 32)
    assert float(pair[0, 16, 6]) == 1.0 and float(pair[0, 16, 25]) == 1.0 and float(pair[0, 16, 16]) == 0.0
    assert float(pair[0, 2, 6]) == 0.0  # above both
    batch = train_data.collate([data[(0, 0, 0)], data[(0, 1, data.items.index("pair"))]])
    assert batch["mask"].shape == (2, 1, 32, 32)
    assert "mask" not in train_data.TrainSet(str(out), 32, Processor(), seed=0)[(0, 0, 0)]
