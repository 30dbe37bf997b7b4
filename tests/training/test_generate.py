"""python -m na_engine.standalone.generate, and the diffusers processor against the ComfyUI patch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_diffusers import make_base, make_clip_vision, make_photos

from na_engine.adapter import random_adapter
from na_engine.binding import ModelCall, Placement
from na_engine.formats import save_adapter
from na_engine.hosts.comfy_patch import ROWS_KEY, NestedAttentionPatch, NestedRun
from na_engine.hosts.diffusers_processor import NestedAttnProcessor, NestedProcessors
from na_engine.layers import diffusers_layers
from na_engine.resampler import ResamplerConfig
from na_engine.subjects import Subject

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_UNET = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 2,
    up_block_types=["CrossAttnUpBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
)
RESAMPLER = ResamplerConfig(
    dim=32, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=32, ff_mult=2
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    adapter = str(root / "adapter.safetensors")
    save_adapter(random_adapter(RESAMPLER, diffusers_layers(TINY_UNET), seed=1), adapter)
    return {
        "base": make_base(str(root / "base")),
        "vision": make_clip_vision(str(root / "vision")),
        "photos": make_photos(str(root / "photos"), count=2),
        "adapter": adapter,
        "root": root,
    }


def generate(world, *args):
    cmd = [
        sys.executable,
        "-m",
        "na_engine",
        "generate",
        "--base",
        world["base"],
        "--adapter",
        world["adapter"],
        "--clip-vision",
        world["vision"],
        "--steps",
        "2",
        "--size",
        "32",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strength, rows", [(1.0, [0, 1]), (0.7, [1]), (1.5, [1])])
def test_processor_and_comfy_patch_give_the_same_layer_output(strength, rows):
    """Same q/k/v, same adapter, same trigger rows: the diffusers processor on an Attention module
    and ComfyUI's attn2 replace (driven as ComfyUI drives it) agree."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    layers = diffusers_layers(TINY_UNET)
    adapter = random_adapter(RESAMPLER, layers, seed=2)
    attn = Attention(query_dim=32, cross_attention_dim=32, heads=4, dim_head=8).eval()
    hidden, context = torch.randn(2, 16, 32), torch.randn(1, 10, 32).repeat(2, 1, 1)
    tokens = torch.randn(4, 32)
    where = torch.zeros(2, 10, dtype=torch.bool)
    where[rows, 3] = True

    processors = NestedProcessors()
    attn.set_processor(NestedAttnProcessor(processors, layers[0]))
    subject = Subject(tokens, adapter, "dog")
    with torch.no_grad(), processors.bound(ModelCall([Placement(subject, where, strength)], (4, 4))):
        ours = attn(hidden, encoder_hidden_states=context)
    assert processors.call is None and processors.fired == {layers[0].comfy: 1}

    run = NestedRun([Subject(tokens, adapter, "dog", strength)], [[3]], context[:1])
    patch = NestedAttentionPatch(run, layers[0].comfy)
    options = {
        "n_heads": 4,
        "block": layers[0].comfy[:2],
        "block_index": 0,
        ROWS_KEY: {run.uid: ModelCall([Placement(run.subjects[0], where)], (4, 4))},
    }
    with torch.no_grad():
        q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
        theirs = attn.to_out[0](patch(q, k, v, options))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        ours,
        attn.to_out[0](
            torch.nn.functional.scaled_dot_product_attention(
                q.view(2, 16, 4, 8).transpose(1, 2),
                k.view(2, 10, 4, 8).transpose(1, 2),
                v.view(2, 10, 4, 8).transpose(1, 2),
            )
            .transpose(1, 2)
            .reshape(2, 16, 32)
        ),
    )


def test_generate_one_subject_with_maps(world):
    out = world["root"] / "one"
    run = generate(
        world,
        "--subject",
        os.path.join(world["photos"], "photo_0.png"),
        "--trigger",
        "dog",
        "--prompt",
        "a photo of a dog",
        "a dog on the beach",
        "--seed",
        "1",
        "2",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.endswith(".maps.png")]) == 4 and "manifest.csv" in files


def test_generate_batch_json_and_csv(world):
    spec = {
        "prompts": ["a photo of a dog", "a red dog in snow"],
        "subjects": [{"name": "pup", "images": world["photos"], "trigger": "dog"}],
        "seeds": [3],
    }
    (world["root"] / "jobs.json").write_text(json.dumps(spec))
    run = generate(
        world, "--batch", str(world["root"] / "jobs.json"), "--no-maps", "--out", str(world["root"] / "json")
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(os.listdir(world["root"] / "json")) == ["0000_pup_3.png", "0001_pup_3.png", "manifest.csv"]
    (world["root"] / "jobs.csv").write_text(
        "prompt,subject,trigger,seed\na cat on the beach,photos/photo_1.png,cat,5\n"
    )
    run = generate(
        world,
        "--batch",
        str(world["root"] / "jobs.csv"),
        "--no-maps",
        "--cfg",
        "1",
        "--out",
        str(world["root"] / "csv"),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "0000_photo_1_5.png" in os.listdir(world["root"] / "csv")


def test_trigger_missing_from_prompt_is_a_clear_error(world):
    run = generate(
        world,
        "--subject",
        world["photos"],
        "--trigger",
        "bottle",
        "--prompt",
        "a photo of a dog",
        "--out",
        str(world["root"] / "x"),
    )
    assert run.returncode == 2 and run.stderr.startswith("error: The trigger word 'bottle' is not in the prompt")


def test_only_the_positive_row_binds_and_strength_matters(world):
    from PIL import Image

    from na_engine.families.unet import load_base
    from na_engine.formats import load_adapter
    from na_engine.standalone.generate import NestedGenerator
    from na_engine.standalone.models import load_vision

    base, vision = load_base(world["base"]), load_vision(world["vision"])
    generator = NestedGenerator(base, vision, load_adapter(world["adapter"]), "cpu")
    seen = []
    binder = generator.processors.binder
    original = binder.bindings
    binder.bindings = lambda call, key, q: seen.append(original(call, key, q)) or seen[-1]
    subject = generator.encode([Image.open(os.path.join(world["photos"], "photo_0.png"))], "dog")
    strong, _ = generator("a photo of a dog", subject, seed=0, steps=2, size=32, maps=False)
    assert seen and all(b[0][1].where[:, 5].tolist() == [False, True] and int(b[0][1].where.sum()) == 1 for b in seen)
    none, _ = generator("a photo of a dog", subject, seed=0, steps=2, size=32, strength=0.0, maps=False)
    assert strong.tobytes() != none.tobytes()
    assert generator.processors.call is None and generator.processors.fired


def test_import_na_engine_does_not_import_diffusers():
    code = (
        "import sys, na_engine; bad = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_several_subjects_decoupled_mode_and_trigger_weight(world):
    """Two subjects in one prompt bind their own words; decoupled mode and the trigger weight change the image."""
    from PIL import Image

    from na_engine.families.unet import load_base
    from na_engine.formats import load_adapter
    from na_engine.standalone.generate import NestedGenerator
    from na_engine.standalone.models import load_vision

    base, vision = load_base(world["base"]), load_vision(world["vision"])
    generator = NestedGenerator(base, vision, load_adapter(world["adapter"]), "cpu")
    photo = Image.open(os.path.join(world["photos"], "photo_0.png"))
    dog, cat = generator.encode([photo], "dog"), generator.encode([photo.rotate(90)], "cat")
    run = dict(seed=0, steps=2, size=32)
    both, maps = generator("a dog and a cat", [dog, cat], **run)
    assert maps is not None and maps.width > both.width  # one panel row per subject
    one, _ = generator("a dog and a cat", dog, maps=False, **run)
    assert both.tobytes() != one.tobytes()
    decoupled, _ = generator("a dog and a cat", dog.with_(mode="decoupled"), maps=False, **run)
    heavy, _ = generator("a dog and a cat", dog, maps=False, trigger_weight=4.0, **run)
    assert len({one.tobytes(), decoupled.tobytes(), heavy.tobytes()}) == 3
