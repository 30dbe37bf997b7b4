"""The trainer on tiny random diffusers models (CPU): loss, resume, export, and one math path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_diffusers import make_base, make_clip_vision, make_photo_masks, make_photos

from na_engine.attention import NestedBinding, nested_attention
from na_engine.errors import NestedAttentionError
from na_engine.formats import load_adapter, save_adapter
from na_engine.layers import TABLES, diffusers_layers
from na_engine.standalone.train import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD15 = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
)
SDXL = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from na_engine.standalone.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    data = str(root / "data")
    prepare(make_photos(str(root / "photos"), count=4), data, "dog", resolution=32)
    return {
        "base": make_base(str(root / "base")),
        "vision": make_clip_vision(str(root / "vision")),
        "data": data,
        "root": root,
    }


def config(world, out, **kw):
    kw = {
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "tokens": 4,
        "resampler_depth": 1,
        "checkpoint_every": 2,
        "caption_dropout": 0.2,
        "subject_dropout": 0.2,
        **kw,
    }
    return TrainConfig(
        base=world["base"], clip_vision=world["vision"], data=world["data"], out=str(world["root"] / out), **kw
    )


def read_loss(cfg):
    with open(os.path.join(cfg.run_dir, "loss.csv")) as f:
        return [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]


# -- layer tables ---------------------------------------------------------------------------


def test_layer_table_from_config_matches_the_canonical_tables():
    assert diffusers_layers(SD15) == TABLES["sd15"]
    assert diffusers_layers(SDXL) == TABLES["sdxl"]


def test_layer_table_follows_attn_processors_order(world):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(world["base"], subfolder="unet")
    names = [k[: -len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
    layers = diffusers_layers(unet.config)
    assert [layer.diffusers for layer in layers] == names
    modules = dict(unet.named_modules())
    assert [layer.width for layer in layers] == [modules[n].to_q.out_features for n in names]
    # ComfyUI ids with one layer per block: input 1 (level 0), 3 (level 1, after a downsampler); output 0-3
    assert [layer.comfy for layer in layers] == [
        ("input", 1, 0),
        ("input", 3, 0),
        ("output", 0, 0),
        ("output", 1, 0),
        ("output", 2, 0),
        ("output", 3, 0),
        ("middle", 0, 0),
    ]


# -- gradients through nested attention -----------------------------------------------------


def test_closed_form_gradients_and_fused_agreement():
    torch.manual_seed(0)
    b, n, t, h, d, m = 2, 6, 5, 2, 4, 3
    q, k, v = (
        torch.randn(b, n, h * d, dtype=torch.float64),
        torch.randn(b, t, h * d, dtype=torch.float64),
        torch.randn(b, t, h * d, dtype=torch.float64),
    )
    nk, nv = torch.randn(m, h * d, dtype=torch.float64), torch.randn(m, h * d, dtype=torch.float64)
    where = torch.zeros(b, t, dtype=torch.bool)
    where[0, 2] = where[1, 3] = True

    def run(closed, q, k, v, nk, nv):
        return nested_attention(
            q, k, v, h, [NestedBinding(nk, nv, where, 0.8)], method="closed_form" if closed else "fused"
        )

    inputs = [x.clone().requires_grad_() for x in (q, k, v, nk, nv)]
    assert torch.autograd.gradcheck(lambda *a: run(True, *a), inputs)
    # the fused path writes q through out= and cannot backprop into q; into k, v, K~ and V~ it equals the closed form
    rest = [x.clone().requires_grad_() for x in (k, v, nk, nv)]
    closed = torch.autograd.grad(run(True, q, *rest).square().sum(), rest)
    fused = torch.autograd.grad(run(False, q, *rest).square().sum(), rest)
    for a, c in zip(fused, closed):
        torch.testing.assert_close(a, c)


# -- training -------------------------------------------------------------------------------


def test_loss_goes_down_on_a_fixed_batch(world):
    cfg = config(
        world,
        "overfit.safetensors",
        steps=30,
        lr=3e-2,
        fixed_batch=True,
        caption_dropout=0.0,
        subject_dropout=0.0,
        checkpoint_every=1000,
    )
    train(cfg)
    loss = read_loss(cfg)
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    assert len(loss) == 30 and last < 0.92 * first, (first, last)  # about 1.07 -> 0.94 on these tiny models


def test_resume_is_exact(world):
    """A run stopped at step 2 and resumed to 3 equals a run of 3 (a constant schedule: a cosine one is set by
    --steps, so a run extended past its planned end follows another curve)."""
    same = {"ema": 0.5, "grad_accum": 2, "lr_schedule": "constant"}
    whole = config(world, "whole.safetensors", steps=3, **same)
    train(whole)
    part = config(world, "part.safetensors", steps=2, **same)
    train(part)
    train(config(world, "part.safetensors", steps=3, resume="latest", **same))
    a, b = load_adapter(whole.out).state_dict(), load_adapter(part.out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_loss(whole) == read_loss(part)


def test_export_matches_trained_weights_in_both_paths(world):
    """The exported file, read by load_adapter (what the ComfyUI loader node calls), gives the nested K/V
    that the diffusers processors compute from the weights the trainer checkpointed."""
    from na_engine.standalone import train_state
    from na_engine.subjects import Subject

    cfg = config(world, "export.safetensors", steps=2, ema=0.0)  # the live weights are exported, as checkpointed
    train(cfg)
    comfy_side = load_adapter(cfg.out)
    trained = load_adapter(cfg.out)  # same architecture; overwrite with the checkpointed training weights
    trained.load_state_dict(
        train_state.load(os.path.join(cfg.run_dir, "checkpoint-0000002", "state.safetensors"))["adapter"]
    )
    tokens = torch.randn(4, comfy_side.config.output_dim)
    subject = Subject(tokens, trained, "dog")  # the subject a training step binds, its tokens needing no grad here
    for layer in comfy_side.layers:
        binding = NestedBinding(
            *subject.nested_kv(layer.index, "cpu", torch.float32), torch.ones(1, 16, dtype=torch.bool)
        )
        k, v = comfy_side.nested_kv(layer.index, tokens)
        torch.testing.assert_close(binding.keys, k, rtol=0, atol=0)
        torch.testing.assert_close(binding.values, v, rtol=0, atol=0)


def test_decoupled_mode_trains_and_saves_the_ip_adapter_plus_layout(world):
    """--mode decoupled: IP-Adapter Plus training; the file has its keys (image_proj.*, ip_adapter.<2i+1>.to_k_ip)
    and the loader reads it as an IP-Adapter Plus file, whose weights are the trained ones."""
    from safetensors import safe_open

    from na_engine.formats import read_state_dict

    cfg = config(world, "decoupled.safetensors", steps=2, mode="decoupled")
    train(cfg)
    with safe_open(cfg.out, framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.latents", "ip_adapter.1.to_k_ip.weight", "ip_adapter.13.to_v_ip.weight"} <= keys
    assert not any(k.startswith(("layers.", "resampler.")) for k in keys)
    adapter = load_adapter(cfg.out)
    assert adapter.family == "ip_adapter_plus" and len(adapter.layers) == 7
    sd, _ = read_state_dict(cfg.out)
    torch.testing.assert_close(adapter.to_v[6].weight, sd["ip_adapter.13.to_v_ip.weight"].float())


def test_decoupled_and_nested_training_differ(world):
    """The mode changes what trains: the same seed and data give other weights."""
    nested = config(world, "n.safetensors", steps=2)
    decoupled = config(world, "d.safetensors", steps=2, mode="decoupled")
    train(nested), train(decoupled)
    assert not torch.equal(load_adapter(nested.out).to_k[0].weight, load_adapter(decoupled.out).to_k[0].weight)


def test_trigger_weight_changes_training_and_is_checked(world, tmp_path):
    """--trigger-weight reaches the training step (other weights from the same seed and data); 0 is refused."""
    plain = config(world, "w1.safetensors", steps=2, subject_dropout=0.0)
    heavy = config(world, "w4.safetensors", steps=2, subject_dropout=0.0, trigger_weight=4.0)
    train(plain), train(heavy)
    assert read_loss(plain) != read_loss(heavy)
    assert not torch.equal(load_adapter(plain.out).to_v[0].weight, load_adapter(heavy.out).to_v[0].weight)
    with pytest.raises(NestedAttentionError, match=r"--trigger-weight 0.0 \(expected above 0 to 10\)"):
        train(config(world, "w0.safetensors", steps=1, trigger_weight=0.0))


def test_subject_loss_weight_reaches_the_step_and_needs_masks(world, tmp_path):
    """--subject-loss-weight changes what trains on a set prepared with masks, and is recorded for a resume; a set
    without masks is refused before any model loads, naming the fix."""
    from na_engine.standalone.prepare import prepare

    photos = str(world["root"] / "photos")
    masked = {**world, "data": str(tmp_path / "masked")}
    prepare(photos, masked["data"], "dog", resolution=32, masks=make_photo_masks(photos, str(tmp_path / "masks")))
    plain = config(masked, "m1.safetensors", steps=2, subject_dropout=0.0)
    heavy = config(masked, "m5.safetensors", steps=2, subject_dropout=0.0, subject_loss_weight=5.0)
    train(plain), train(heavy)
    assert read_loss(plain) != read_loss(heavy)
    assert not torch.equal(load_adapter(plain.out).to_v[0].weight, load_adapter(heavy.out).to_v[0].weight)
    with open(os.path.join(heavy.run_dir, "checkpoint-0000002", "trainer.json")) as f:
        assert json.load(f)["subject_loss_weight"] == 5.0
    with pytest.raises(NestedAttentionError, match=r"have no mask file .*prepare again with --masks"):
        train(config(world, "nomask.safetensors", steps=1, subject_loss_weight=5.0))
    with pytest.raises(NestedAttentionError, match=r"--subject-loss-weight 0.5 \(expected 1 to 1000\)"):
        train(config(masked, "half.safetensors", steps=1, subject_loss_weight=0.5))


def test_validation_writes_images_and_maps(world):
    cfg = config(
        world,
        "val.safetensors",
        steps=2,
        validate_every=2,
        validation_steps=2,
        validation_prompts=["a dog on the beach"],
    )
    train(cfg)
    files = sorted(os.listdir(os.path.join(cfg.run_dir, "validation")))
    assert files == ["step0000002_0.maps.png", "step0000002_0.png"]


# -- errors ---------------------------------------------------------------------------------


def test_bad_inputs_fail_before_loading(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NestedAttentionError, match="not a prepared training set"):
        train(TrainConfig(world["base"], world["vision"], str(empty), str(tmp_path / "a.safetensors")))
    (empty / "dataset.json").write_text(json.dumps({"class_word": "dog", "resolution": 32, "items": ["gone"]}))
    with pytest.raises(NestedAttentionError, match="is empty"):
        train(TrainConfig(world["base"], world["vision"], str(empty), str(tmp_path / "a.safetensors")))


def test_base_and_clip_vision_mismatch_names_both(world, tmp_path):
    from diffusers import UNet2DConditionModel

    from na_engine.adapter import random_adapter
    from na_engine.standalone.models import fresh_config

    unet_cfg = UNet2DConditionModel.load_config(world["base"], subfolder="unet")
    wide = fresh_config(unet_cfg["cross_attention_dim"], 48, tokens=4, depth=1)
    other = random_adapter(wide, diffusers_layers(unet_cfg))
    save_adapter(other, str(tmp_path / "wide.safetensors"))
    with pytest.raises(NestedAttentionError, match=r"width 48.*width 32"):
        train(config(world, "m.safetensors", init_from=str(tmp_path / "wide.safetensors")))
    sd15 = random_adapter(
        fresh_config(64, 32, tokens=4, depth=1),
        diffusers_layers({**SD15, "block_out_channels": [64, 64, 64, 64]}),
    )
    save_adapter(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(NestedAttentionError, match=r"an unknown model with 16 layers.*is an unknown model with 7 lay"):
        train(config(world, "m.safetensors", init_from=str(tmp_path / "sd15.safetensors")))


def test_out_of_memory_names_the_settings(world, monkeypatch):
    import na_engine.standalone.train as trainer

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.NestedDenoiser, "forward", oom)
    with pytest.raises(NestedAttentionError) as err:
        train(config(world, "oom.safetensors"))
    for flag in ("--batch-size", "--resolution", "--gradient-checkpointing", "--mixed-precision"):
        assert flag in str(err.value)


def test_cli_trains_plainly_and_reports_bad_input(world):
    out = str(world["root"] / "cli.safetensors")
    args = ["--base", world["base"], "--clip-vision", world["vision"], "--data", world["data"], "--out", out]
    tiny = [
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--tokens",
        "4",
        "--resampler-depth",
        "1",
        "--mixed-precision",
        "bf16",
        "--gradient-checkpointing",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "na_engine", "train", *args, *tiny],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_adapter(out).config.num_queries == 4
    bad = subprocess.run(
        [sys.executable, "-m", "na_engine", "train", *args[:4], "--data", "/nonexistent", "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: Data folder not found")


def test_cli_defaults_are_the_config_defaults():
    from na_engine.standalone.train import parse

    required = ["--base", "b", "--clip-vision", "c", "--data", "d", "--out", "o.safetensors"]
    assert parse(required) == TrainConfig("b", "c", "d", "o.safetensors")
    assert parse(required + ["--validation-prompt", "x", "--validation-prompt", "y"]).validation_prompts == ["x", "y"]


def test_single_file_base_trains_and_generates_as_its_folder(world, tmp_path):
    """--base model.safetensors --base-config FOLDER: the same weights as the folder, so the same training
    and the same images; a config folder that does not name its components is a clear error."""
    import shutil

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from single_file import write_single_file

    from na_engine.standalone.generate import main as generate

    single = write_single_file(world["base"], str(tmp_path / "tiny.safetensors"))
    configs = tmp_path / "configs"  # the folder without its weights: everything must come from the file
    shutil.copytree(world["base"], configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    from_folder = config(world, "folder.safetensors", steps=2)
    from_file = config(world, "file.safetensors", steps=2, base_config=str(configs))
    from_file.base = single
    train(from_folder)
    train(from_file)
    a, b = load_file(from_folder.out), load_file(from_file.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    common = ["--clip-vision", world["vision"], "--adapter", from_file.out, "--subject", str(world["root"] / "photos")]
    common += ["--trigger", "dog", "--prompt", "a photo of a dog", "--steps", "2", "--size", "32", "--no-maps"]
    assert generate(["--base", world["base"], *common, "--out", str(tmp_path / "a")]) == 0
    assert generate(["--base", single, "--base-config", str(configs), *common, "--out", str(tmp_path / "b")]) == 0
    pixels = [np.asarray(Image.open(tmp_path / d / "0000_photos_0.png")) for d in ("a", "b")]
    assert np.array_equal(*pixels)

    bare = tmp_path / "bare"
    shutil.copytree(world["base"], bare)
    (bare / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    cfg = config(world, "bare.safetensors", steps=1, base_config=str(bare))
    cfg.base = single
    with pytest.raises(NestedAttentionError, match=r"model_index.json does not name unet, vae, text_encoder"):
        train(cfg)


def test_a_fresh_run_beside_an_earlier_runs_checkpoints_is_refused(world):
    cfg = config(world, "twice.safetensors", steps=2)
    train(cfg)
    with pytest.raises(NestedAttentionError, match=r"twice.safetensors already exists"):
        train(cfg)
    os.remove(cfg.out)  # the adapter moved away: the run folder's checkpoints still refuse a fresh run
    with pytest.raises(NestedAttentionError, match=r"holds checkpoints of an earlier run \(up to checkpoint-0000002\)"):
        train(cfg)
