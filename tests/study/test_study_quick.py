"""`python -m study run --quick`: the whole ladder at toy scale, its files, its records and its refusals.

It checks the pipeline and the formats, not the numbers (toy models learn nothing in a few steps).
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from study import base, config, world
from study.run import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = "# title\n\n<!-- study:start -->\nold\n<!-- study:end -->\n\n## after\n"


def study_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in this process: its exit code, as the command line's would be, and its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["python", "-m", "study", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    docs = tmp_path_factory.mktemp("docs")
    (docs / "README.md").write_text(BLOCK)
    (docs / "STUDY.md").write_text(BLOCK)
    cmd = [sys.executable, "-m", "study", "run", "--quick", "--out", str(out), "--docs", str(docs)]
    cmd += ["--readme", str(docs / "README.md")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, docs, done.stdout


def test_every_stage_is_recorded_and_the_ladder_has_every_rung(quick_run):
    out, docs, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["ladder"]) == {"r0", "r1", "r2", "r3", "r4"}
    assert results["ladder"]["r0"]["true_renders"] == 1.0  # the reader on true renders, even at toy scale
    for rung in ("r0", "r1", "r2"):
        assert isinstance(results["ladder"][rung]["holds"], bool), rung
    assert results["ladder"]["r3"]["holds"] is None and results["ladder"]["r4"]["holds"] is None
    stages = json.loads((out / "stages.json").read_text())
    for name in ("world", "reader", "autoencoder", "base", "described", "encoders", "fit", "class_word"):
        assert stages[name]["stage_seconds"] >= 0, name
    assert results["run_seconds"] == pytest.approx(sum(stages[k]["stage_seconds"] for k in stages if k != "config"))
    held = stages["described"]["heldout"]
    assert held["n"] == config.QUICK.r1_cases and set(held) >= {"identity", *world.PARTS, "background", "pose"}
    assert json.loads((docs / "study" / "results.json").read_text()) == results


def test_the_blocks_are_filled_and_the_rest_kept(quick_run):
    _, docs, _ = quick_run
    for name in ("README.md", "STUDY.md"):
        text = (docs / name).read_text()
        assert text.startswith("# title\n\n<!-- study:start -->\n## Does it work?") and text.endswith("\n## after\n")
        assert "\nold\n" not in text and "| R1 the base draws what it is told |" in text
    assert "](docs/study/described_heldout.png)" in (docs / "README.md").read_text()
    assert "](study/described_heldout.png)" in (docs / "STUDY.md").read_text()
    assert {"described_heldout.png", "fit_nested.png"} <= set(os.listdir(docs / "study"))


def test_the_base_and_adapter_are_what_the_commands_load(quick_run, tmp_path):
    """The base is a diffusers SD folder and the adapter ours: `python -m na_engine generate` draws a held-out
    product from a reference photo with them, as a user (or the hidden check) would."""
    from PIL import Image

    from na_engine.families import folder_family
    from na_engine.families.unet import load_base

    out, _, _ = quick_run
    loaded = load_base(str(out / "base"))
    assert loaded.scheduler.config.prediction_type == "v_prediction" and not loaded.is_xl
    assert json.loads((out / "base" / "na_engine.json").read_text()) == {"latents": "mean", "resolution": 32}
    folder = str(out / "base")
    assert len(folder_family(folder, None).folder_layers(folder, None)) == 7  # attention at 8x8, 4x4 and mid
    _, heldout = world.split(world.all_products(), config.QUICK.heldout)
    rng = np.random.default_rng(0)
    scene = world.random_scene(rng, heldout[0])
    Image.fromarray(world.render(world.reference(rng, scene.products[0]))).save(tmp_path / "ref.png")
    cmd = [sys.executable, "-m", "na_engine", "generate", "--base", str(out / "base"), "--clip-vision",
           str(out / "encoders" / "vision"), "--adapter", str(out / "encoders" / "adapters" / "nested.safetensors"),
           "--prompt", world.caption(scene), "--subject", str(tmp_path / "ref.png"), "--trigger",
           heldout[0].kind, "--seed", "1", "--steps", "2", "--cfg", "1", "--size", "32", "--out", str(tmp_path / "o"),
           "--no-maps"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pngs = [f for f in os.listdir(tmp_path / "o") if f.endswith(".png")]
    assert len(pngs) == 1 and Image.open(tmp_path / "o" / pngs[0]).size == (32, 32)


def test_a_finished_run_resumes_without_redoing_stages(quick_run):
    out, _, _ = quick_run
    done = study_cli("run", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("world", "reader", "autoencoder", "base", "described", "encoders", "fit", "class_word"):
        assert f"{stage}: done before, kept" in done.stdout


def test_a_run_with_other_settings_is_refused_and_kept(quick_run):
    out, _, _ = quick_run
    before = (out / "stages.json").read_text()
    done = study_cli("run", "--quick", "--out", str(out), "--set", "base_steps=13")
    assert done.returncode == 2 and "other settings (base_steps)" in done.stderr and "Traceback" not in done.stderr
    assert (out / "stages.json").read_text() == before


@pytest.mark.parametrize(
    "pair, message",
    [("nope=1", "FIELD one of"), ("base_steps=many", "'many' is not a int"), ("base_steps", "FIELD=VALUE")],
)
def test_a_bad_override_is_refused_with_the_field_named(tmp_path, pair, message):
    done = study_cli("run", "--quick", "--out", str(tmp_path / "run"), "--set", pair)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_rung_that_does_not_hold_stops_the_gated_run(tmp_path):
    """At toy scale the autoencoder learns nothing, so R0 fails through it and the base is not attempted."""
    done = study_cli("run", "--quick", "--out", str(tmp_path / "run"), "--set", "gated=true")
    assert done.returncode == 0, done.stderr[-2000:]
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["ladder"]["r0"]["holds"] is False and "base" not in stages
    assert "base: not attempted, R0 does not hold" in done.stdout


def test_base_training_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    cfg = config.override(config.QUICK, ["base_steps=4", "checkpoint_every=2"])
    train, _ = world.split(world.all_products(), cfg.heldout)
    renders = base.Renders(train[::60], 2, 0)  # six products of every kind (a pair needs two kinds)
    latents = renders.pixels[:, :, ::2, ::2].repeat(1, 2, 1, 1)[:, :4]  # any (n, 4, 16, 16): not the point here
    base.write_tokenizer(str(tmp_path / "tok"), world.words(), base.MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    straight = base.train_base(cfg, str(tmp_path / "a"), latents, renders, tok, lambda _: None)
    save = base.Training.save

    def save_then_stop(self, folder):  # the process killed right after its first checkpoint (step 2)
        save(self, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(base.Training, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        base.train_base(cfg, str(tmp_path / "b"), latents, renders, tok, lambda _: None)
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "state.json").read_text()) == {"step": 2}
    resumed = base.train_base(cfg, str(tmp_path / "b"), latents, renders, tok, lambda _: None)
    for module in ("unet", "text"):
        for a, b in zip(straight[module].state_dict().values(), resumed[module].state_dict().values()):
            assert bool((a == b).all())
