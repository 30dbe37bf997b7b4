"""python -m na_engine generate with a Flux base: a tiny FluxPipeline folder (tests/support), a Flux adapter."""

import os
import subprocess
import sys

import pytest
import torch
from tiny_diffusers import make_clip_vision, make_flux_base, make_photos

from na_engine.adapter import random_adapter
from na_engine.families import folder_family
from na_engine.families.flux import FLUX, trigger_where
from na_engine.formats import save_adapter
from na_engine.resampler import ResamplerConfig
from na_engine.standalone.generate import NestedGenerator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESAMPLER = ResamplerConfig(
    dim=32, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=32, ff_mult=2
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    base = make_flux_base(str(root / "flux"))
    adapter = str(root / "flux_adapter.safetensors")
    save_adapter(random_adapter(RESAMPLER, FLUX.folder_layers(base), seed=1), adapter)
    return {
        "base": base,
        "vision": make_clip_vision(str(root / "vision")),
        "photos": make_photos(str(root / "photos"), count=2),
        "adapter": adapter,
        "root": root,
    }


def generate(world, *args, adapter=None):
    cmd = [sys.executable, "-m", "na_engine", "generate", "--base", world["base"], "--clip-vision", world["vision"]]
    cmd += ["--adapter", adapter or world["adapter"], "--steps", "2", "--size", "32", "--cfg", "3.5", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_flux_folder_is_read_as_two_joint_layers(world):
    layers = FLUX.folder_layers(world["base"])
    assert folder_family(world["base"]) is FLUX and [layer.comfy for layer in layers] == [
        ("double_block", 0, 0),
        ("single_block", 0, 0),
    ]
    assert [layer.diffusers for layer in layers] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert all(layer.width == 32 for layer in layers)


def test_generate_on_flux_with_a_subject_and_maps(world):
    out = world["root"] / "one"
    photo = os.path.join(world["photos"], "photo_0.png")
    run = generate(world, "--subject", photo, "--trigger", "bottle", "--prompt", "a photo of a bottle",
                   "--seed", "1", "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["0000_photo_0_1.maps.png", "0000_photo_0_1.png", "manifest.csv"]
    base = world["root"] / "base"
    plain = generate(world, "--prompt", "a photo of a bottle", "--seed", "1", "--out", str(base))
    assert plain.returncode == 0, plain.stderr[-3000:]
    from PIL import Image

    with Image.open(out / "0000_photo_0_1.png") as a, Image.open(base / "0000_base_1.png") as b:
        assert a.size == b.size == (32, 32) and a.tobytes() != b.tobytes()  # the subject changed the image


def test_the_generator_binds_the_t5_positions_and_strength_zero_is_the_base(world):
    from PIL import Image

    from na_engine.formats import load_adapter
    from na_engine.standalone.models import load_vision

    gen = NestedGenerator(FLUX.load(world["base"], None, torch.float32), load_vision(world["vision"]),
                          load_adapter(world["adapter"]), "cpu")  # fmt: skip
    where = trigger_where(gen.pipe.tokenizer_2, "a photo of a bottle", "bottle", gen.base.text_length)
    ids = gen.pipe.tokenizer_2("a photo of a bottle").input_ids
    assert where.shape == (1, 16) and where[0].nonzero()[:, 0].tolist() == [ids.index(gen.pipe.tokenizer_2(
        "bottle", add_special_tokens=False).input_ids[0])]  # fmt: skip
    subject = gen.encode([Image.open(os.path.join(world["photos"], "photo_0.png")).convert("RGB")], "bottle")
    on, _ = gen("a photo of a bottle", subject, 1, steps=2, size=32, maps=False)
    off, _ = gen("a photo of a bottle", subject, 1, steps=2, size=32, strength=0.0, maps=False)
    plain = NestedGenerator(gen.base, gen.vision, None, "cpu")
    base, _ = plain("a photo of a bottle", [], 1, steps=2, size=32, maps=False)
    assert off.tobytes() == base.tobytes() and on.tobytes() != base.tobytes()
    assert set(gen.processors.fired) == {("double_block", 0, 0), ("single_block", 0, 0)}


def test_flux_refusals_are_clear(world, tmp_path):
    photo = os.path.join(world["photos"], "photo_0.png")
    common = ["--subject", photo, "--trigger", "bottle", "--prompt", "a photo of a bottle"]
    run = generate(world, *common, "--negative", "blurry", "--out", str(tmp_path / "neg"))
    assert run.returncode != 0 and "no negative prompt" in run.stderr and "Traceback" not in run.stderr
    run = generate(world, *common, "--mode", "decoupled", "--out", str(tmp_path / "dec"))
    assert run.returncode != 0 and "not available on Flux" in run.stderr and "Traceback" not in run.stderr
    unet = str(tmp_path / "unet_adapter.safetensors")
    from na_engine.layers import TABLES

    save_adapter(random_adapter(RESAMPLER, TABLES["sd15"][:2], seed=1), unet)
    run = generate(world, *common, "--out", str(tmp_path / "unet"), adapter=unet)
    assert run.returncode != 0 and "Traceback" not in run.stderr and "made for" in run.stderr
