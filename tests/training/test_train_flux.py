"""python -m na_engine train with a Flux base: flow matching on a tiny FluxPipeline folder (tests/support)."""

import os
import subprocess
import sys

import pytest
import torch
from tiny_diffusers import make_clip_vision, make_flux_base, make_photo_masks, make_photos

from na_engine.families.flux import FLUX, image_ids, pack, unpack
from na_engine.formats import load_adapter
from na_engine.standalone.train import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from na_engine.standalone.prepare import prepare

    root = tmp_path_factory.mktemp("flux_train")
    data = str(root / "data")
    prepare(make_photos(str(root / "photos"), count=4), data, "bottle", resolution=32)
    return {
        "base": make_flux_base(str(root / "flux")),
        "vision": make_clip_vision(str(root / "vision")),
        "data": data,
        "root": root,
    }


def config(world, out, **kw):
    kw = {"steps": 4, "batch_size": 2, "lr": 1e-3, "tokens": 4, "resampler_depth": 1, "checkpoint_every": 2, **kw}
    return TrainConfig(
        base=world["base"], clip_vision=world["vision"], data=world["data"], out=str(world["root"] / out), **kw
    )


def read_loss(cfg):
    with open(os.path.join(cfg.run_dir, "loss.csv")) as f:
        return [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]


def test_packing_is_fluxs_own_layout():
    x = torch.randn(2, 4, 8, 6)
    packed = pack(x)
    assert packed.shape == (2, 12, 16) and torch.equal(packed[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    square = torch.randn(1, 4, 8, 8)
    assert torch.equal(unpack(pack(square), 8), square)
    ids = image_ids(4, 3, "cpu")
    assert ids.shape == (12, 3) and ids[4].tolist() == [0.0, 1.0, 1.0]


def test_loss_goes_down_on_a_fixed_batch_and_the_export_loads(world):
    cfg = config(world, "overfit.safetensors", steps=30, lr=3e-2, fixed_batch=True, caption_dropout=0.0,
                 subject_dropout=0.0, checkpoint_every=1000, ema=0.0)  # fmt: skip
    train(cfg)
    loss = read_loss(cfg)
    thirds = [sum(loss[i : i + 10]) / 10 for i in (0, 10, 20)]
    # measured: 1.658 at step 1, 1.621 at step 30; the subject acts through the trigger's share of 80 keys
    assert len(loss) == 30 and thirds[0] > thirds[1] > thirds[2] and loss[-1] < 0.99 * loss[0], loss
    adapter = load_adapter(cfg.out)
    assert [layer.comfy for layer in adapter.layers] == [("double_block", 0, 0), ("single_block", 0, 0)]


def test_subject_loss_weight_is_packed_as_the_latents_are(world, tmp_path):
    """--subject-loss-weight on Flux: the latent-grid weights go through the same 2x2 packing as the target."""
    from na_engine.standalone.prepare import prepare
    from na_engine.standalone.train import subject_weights

    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1  # the top half of the image: the top half of the packed tokens
    packed = pack(subject_weights(mask, torch.Size((1, 4, 4, 4)), 3.0))
    assert packed.shape == (1, 4, 16) and packed[0, :2].eq(3).all() and packed[0, 2:].eq(1).all()
    photos = str(world["root"] / "photos")
    masked = {**world, "data": str(tmp_path / "masked")}
    prepare(photos, masked["data"], "bottle", resolution=32, masks=make_photo_masks(photos, str(tmp_path / "masks")))
    plain = config(masked, "m1.safetensors", steps=2, subject_dropout=0.0)
    heavy = config(masked, "m5.safetensors", steps=2, subject_dropout=0.0, subject_loss_weight=5.0)
    train(plain), train(heavy)
    assert read_loss(plain) != read_loss(heavy)


def test_nested_kv_start_at_the_text_projections_move_in_both_blocks_and_resume_exactly(world):
    """The nested K/V start at the projections the text goes through (a double block's text stream, a single
    block's whole-sequence one) and training moves them in both blocks; a run resumed at step 2 equals an
    uninterrupted one."""
    same = {"lr_schedule": "constant", "ema": 0.5, "subject_dropout": 0.0, "caption_dropout": 0.0}
    whole = config(world, "whole.safetensors", steps=3, **same)
    train(whole)
    part = config(world, "part.safetensors", steps=2, **same)
    train(part)
    train(config(world, "part.safetensors", steps=3, resume="latest", **same))
    a, b = load_adapter(whole.out).state_dict(), load_adapter(part.out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and read_loss(whole) == read_loss(part)
    fresh = FLUX.load(world["base"], None, torch.float32)
    assert fresh.unet.config.guidance_embeds and fresh.text_length == 16
    start = [fresh.unet.transformer_blocks[0].attn.add_k_proj, fresh.unet.single_transformer_blocks[0].attn.to_k]
    for layer, projection in enumerate(start):  # lr 1e-3, 3 steps: each weight moved, by a few thousandths
        moved = (a[f"to_k.{layer}.weight"].float() - projection.weight).abs().max()
        assert 0 < moved < 0.05, (layer, moved)


def test_cli_trains_with_validation_and_refuses_decoupled(world):
    out = str(world["root"] / "cli.safetensors")
    cmd = [sys.executable, "-m", "na_engine", "train", "--base", world["base"], "--clip-vision", world["vision"],
           "--data", world["data"], "--out", out, "--steps", "2", "--batch-size", "2", "--tokens", "4",
           "--resampler-depth", "1", "--validate-every", "2", "--validation-steps", "2"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = os.path.join(os.path.splitext(out)[0] + "_run", "validation")
    assert sorted(os.listdir(folder)) == ["step0000002_0.maps.png", "step0000002_0.png"]
    bad = [*cmd[: cmd.index("--out") + 1], str(world["root"] / "dec.safetensors"), "--mode", "decoupled"]
    run = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "not available on Flux" in run.stderr and "Traceback" not in run.stderr
