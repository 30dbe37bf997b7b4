"""The standalone commands under the bad inputs of issue 31: a crafted checkpoint, numbers that are not finite,
options that would do nothing, broken base folders and catalogues, a full disk, surprising photo folders.

Each case runs main() in-process and asserts the message, exit code 2 for bad input (1 for a full disk), that no
traceback was printed, and that the user's files are byte for byte as they were.
"""

import errno
import json
import os
import pathlib
import pickle
import shutil
import typing
from dataclasses import dataclass, fields
from typing import Optional

import pytest
import torch
from command_checks import command_world, run, snapshot
from PIL import Image
from tiny_diffusers import make_photos

from na_engine.families.flux import FluxFamily
from na_engine.families.unet import UNetFamily
from na_engine.standalone import cli, models, train_state, validate
from na_engine.standalone import generate as gen
from na_engine.standalone import prepare as prep
from na_engine.standalone import train as trainer


class Payload:
    """What a crafted checkpoint holds: unpickling it writes ``marker`` (any code could run there)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "the payload ran"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = command_world(tmp_path_factory.mktemp("untrusted"))
    world["data"] = str(world["root"] / "data")
    prep.prepare(world["photos"], world["data"], "dog", resolution=32)
    return world


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test: what is checked here must be refused before."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(UNetFamily, "load", loaded)
    monkeypatch.setattr(FluxFamily, "load", loaded)
    monkeypatch.setattr(models, "load_vision", loaded)


def _train(world, out, *more, data=None):
    return [
        "--base", world["base"], "--clip-vision", world["vision"], "--data", data or world["data"], "--out", str(out),
        "--steps", "2", "--batch-size", "1", "--tokens", "4", "--resampler-depth", "1", "--checkpoint-every", "2",
        *more,
    ]  # fmt: skip


def _gen(world, out, *more, base=None):
    return [
        "--base", base or world["base"], "--adapter", world["adapter"], "--clip-vision", world["vision"],
        "--steps", "1", "--size", "32", "--no-maps", "--out", str(out), *more,
    ]  # fmt: skip


def _subject(world):
    return ["--prompt", "a dog", "--subject", os.path.join(world["photos"], "photo_0.png"), "--trigger", "dog"]


RESUMED = ("--timestep-bias", "later", "--resolution", "16")  # the options of the trained run


@pytest.fixture(scope="module")
def trained(world):
    """A finished 2-step run with --timestep-bias later, at --resolution 16 (the set's is 32): its adapter, run
    folder and checkpoint."""
    out = world["root"] / "trained.safetensors"
    assert trainer.main(_train(world, out, *RESUMED)) == 0
    run_dir = world["root"] / "trained_run"
    return {"out": out, "run_dir": run_dir, "checkpoint": run_dir / "checkpoint-0000002"}


# -- never unpickle ------------------------------------------------------------------------------


def test_a_checkpoint_is_safetensors_and_json_only(trained):
    checkpoint = trained["checkpoint"]
    assert sorted(os.listdir(checkpoint)) == ["state.safetensors", "trainer.json"]
    state = train_state.load(str(checkpoint / "state.safetensors"))
    assert set(state) == {"adapter", "optimizer", "schedule", "ema"}
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # keys keep their type through the JSON tree


@pytest.mark.parametrize(
    "planted",
    [
        "custom_checkpoint_0.pkl",  # where accelerate's save_state put the EMA, and its loader unpickled it
        "random_states_0.pkl",
        "optimizer.bin",
        "state.safetensors",  # a pickle under the state's own name: found by its first bytes
        "weights",  # torch.save's zip archive, without a telling name
    ],
)
def test_resume_never_runs_a_planted_payload(world, trained, tmp_path, capsys, planted):
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(str(marker)))
    pickle.loads(payload)  # the payload is live: unpickled, it writes the marker
    assert marker.read_text() == "the payload ran"
    marker.unlink()
    out = tmp_path / "trained.safetensors"
    shutil.copy(trained["out"], out)
    shutil.copytree(trained["run_dir"], tmp_path / "trained_run")
    target = tmp_path / "trained_run" / "checkpoint-0000002" / planted
    if planted == "weights":
        torch.save(Payload(str(marker)), target)
    else:
        target.write_bytes(payload)
    before = snapshot(tmp_path)
    argv = _train(world, out, *RESUMED, "--steps", "4", "--resume", "latest")
    rc, err = run(trainer.main, argv, capsys)
    assert rc == 2 and f"holds {planted}: pickle data" in err and "earlier trainer" in err, err
    assert not marker.exists() and snapshot(tmp_path) == before


def test_a_state_that_does_not_fit_is_named(world, trained, tmp_path, capsys):
    out = tmp_path / "trained.safetensors"
    shutil.copy(trained["out"], out)
    shutil.copytree(trained["run_dir"], tmp_path / "trained_run")
    path = str(tmp_path / "trained_run" / "checkpoint-0000002" / "state.safetensors")
    state = train_state.load(path)
    state["adapter"].pop(sorted(state["adapter"])[0])
    train_state.save(path, state)
    rc, err = run(trainer.main, _train(world, out, *RESUMED, "--steps", "3", "--resume", "latest"), capsys)
    assert rc == 2 and "its adapter state does not fit this run (RuntimeError: " in err, err


# -- the parser and the validation pass -------------------------------------------------------------


def test_optional_fields_get_their_real_type():
    @dataclass
    class Config:
        size: Optional[int] = None
        scale: Optional[float] = None
        name: Optional[str] = None

    p = cli.parser("x", "doc")
    cli.add_config_arguments(p, Config, {"size": "", "scale": "", "name": ""})
    args = p.parse_args(["--size", "32", "--scale", "0.5", "--name", "n"])
    assert (args.size, args.scale, args.name) == (32, 0.5, "n")
    assert type(args.size) is int and type(args.scale) is float


def test_resolution_trains_and_must_be_a_multiple_of_8(world, trained, tmp_path, capsys):
    assert trainer.parse(_train(world, tmp_path / "a.safetensors", "--resolution", "16")).resolution == 16
    with open(trained["checkpoint"] / "trainer.json") as f:
        assert json.load(f)["resolution"] == 16 and trained["out"].exists()  # the run of the fixture, at 16
    before = snapshot(world["data"])
    rc, err = run(trainer.main, _train(world, tmp_path / "a.safetensors", "--resolution", "20"), capsys)
    assert rc == 2 and "--resolution is 20; expected a multiple of 8" in err
    assert snapshot(world["data"]) == before and os.listdir(tmp_path) == []


def test_every_numeric_option_has_a_range():
    hints = typing.get_type_hints(trainer.TrainConfig)
    numeric = {f.name for f in fields(trainer.TrainConfig) if cli.value_type(hints[f.name]) in (int, float)}
    assert numeric == set(validate.TRAIN)
    with pytest.raises(KeyError, match="--new-option is a number without a range"):
        validate.numbers({"new_option": 1.0}, validate.TRAIN)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "inf"], "--lr inf (expected above 0 to 1)"),
        (["--lr", "1e30"], "--lr 1e+30 (expected above 0 to 1)"),
        (["--lr", "nan"], "--lr nan"),
        (["--subject-loss-weight", "inf"], "--subject-loss-weight inf (expected 1 to 1000)"),
        (["--trigger-weight", "inf"], "--trigger-weight inf (expected above 0 to 10)"),
        (["--trigger-weight", "nan"], "--trigger-weight nan"),
        (["--timestep-bias", "later", "--timestep-bias-multiplier", "inf"], "--timestep-bias-multiplier inf"),
        (["--timestep-bias", "later", "--timestep-bias-portion", "0"], "--timestep-bias-portion 0.0"),
        (["--caption-dropout", "nan"], "--caption-dropout nan (expected 0 to 1)"),
        (["--timestep-bias-multiplier", "5"], "--timestep-bias-multiplier does nothing without --timestep-bias"),
        (["--white-references"], "--white-references does nothing without subject masks"),
        (["--validation-prompt", "a dog"], "--validation-prompt does nothing without --validate-every"),
        (["--validate-every", "1", "--validation-prompt", "a cat"], "'a cat' lacks the class word 'dog'"),
    ],
)
def test_train_refuses_before_any_model_loads(world, tmp_path, capsys, no_model_loads, flags, message):
    before = snapshot(world["data"])
    rc, err = run(trainer.main, _train(world, tmp_path / "a.safetensors", *flags), capsys)
    assert rc == 2 and message in err, err
    assert snapshot(world["data"]) == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strength", "nan"], "--strength nan (expected 0 to 3)"),
        (["--strength", "inf"], "--strength inf"),
        (["--cfg", "inf"], "--cfg inf (expected 0 to 100)"),
        (["--trigger-weight", "-1"], "--trigger-weight -1.0 (expected 0 to 10)"),
    ],
)
def test_generate_refuses_numbers_before_any_model_loads(world, tmp_path, capsys, no_model_loads, flags, message):
    rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), *flags), capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_generate_refuses_subject_options_for_base_images(world, tmp_path, capsys, no_model_loads):
    argv = ["--base", world["base"], "--clip-vision", world["vision"], "--prompt", "a dog", "--strength", "2"]
    rc, err = run(gen.main, [*argv, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--strength 2.0 act on a subject, and no row has one" in err
    assert not (tmp_path / "o").exists()


def test_base_folders_are_checked_part_by_part(world, tmp_path, capsys, no_model_loads):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    record = base / "na_engine.json"
    for text, message in (
        ("{not json", "na_engine.json is not valid JSON"),
        ('{"latents": "median"}', '"latents" is \'median\'; expected "mean" or "sample"'),
        ('{"resolution": 36}', '"resolution" is 36; expected a whole multiple of 8'),
        ("[1]", "expected an object, not list"),
    ):
        record.write_text(text)
        before = snapshot(base)
        rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), base=str(base)), capsys)
        assert rc == 2 and message in err, (text, err)
        rc, err = run(trainer.main, _train({**world, "base": str(base)}, tmp_path / "a.safetensors"), capsys)
        assert rc == 2 and message in err, (text, err)
        assert snapshot(base) == before
    record.unlink()
    shutil.rmtree(base / "text_encoder")
    rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), base=str(base)), capsys)
    assert rc == 2 and "SD1.5 diffusers folder but lacks text_encoder/config.json, text_encoder/ weights" in err
    flux = tmp_path / "flux"  # a Flux folder missing most of its parts, its transformer's config among them
    shutil.copytree(world["base"], flux, ignore=shutil.ignore_patterns("unet"))
    (flux / "transformer").mkdir()
    (flux / "model_index.json").unlink()
    rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), base=str(flux)), capsys)
    assert rc == 2 and "looks like a Flux diffusers folder but lacks model_index.json, transformer/config.json" in err
    assert "transformer/ weights (.safetensors), " in err and "text_encoder_2/config.json" in err
    assert "tokenizer_2/." in err
    assert "unet" not in err and not (tmp_path / "o").exists()
    pickled = tmp_path / "pickled"  # weights only as .bin: a pickle, never loaded
    shutil.copytree(world["base"], pickled)
    os.replace(
        pickled / "unet" / "diffusion_pytorch_model.safetensors", pickled / "unet" / "diffusion_pytorch_model.bin"
    )
    rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), base=str(pickled)), capsys)
    assert rc == 2 and "lacks unet/ weights (.safetensors)" in err
    (tmp_path / "model.ckpt").write_bytes(b"a checkpoint")
    rc, err = run(gen.main, _gen(world, tmp_path / "o", *_subject(world), base=str(tmp_path / "model.ckpt")), capsys)
    assert rc == 2 and "a single-file base must be .safetensors; a .ckpt or .pt file is a pickle" in err
    vision = tmp_path / "vision"
    shutil.copytree(world["vision"], vision)
    os.replace(vision / "model.safetensors", vision / "pytorch_model.bin")
    rc, err = run(gen.main, [*_gen(world, tmp_path / "o", *_subject(world)), "--clip-vision", str(vision)], capsys)
    assert rc == 2 and "holds no .safetensors weights" in err and not (tmp_path / "o").exists()


def test_a_json_catalogue_is_typed_field_by_field(world, tmp_path, capsys, no_model_loads):
    jobs = tmp_path / "jobs.json"
    photo = os.path.join(world["photos"], "photo_0.png")
    for spec, messages in (
        (
            {"prompts": "a dog", "subjects": [{"name": "rex", "images": 5, "trigger": "dog"}], "seeds": "12"},
            ["prompts: expected a list of prompts (text), not 'a dog'", "subjects[0].images: expected a photo",
             "seeds: expected a list of whole numbers"],
        ),
        (
            {"prompts": ["a dog", 7], "subjects": [{"name": "rex", "images": photo, "trigger": ""}],
             "seeds": [1, "2", True], "seed": 3},
            ["prompts[1]: expected prompts (text), not 7", "subjects[0].trigger: expected text, not ''",
             "seeds[1]: expected whole numbers", "seeds[2]", "unknown field 'seed'"],
        ),
        ([1, 2], ["must hold {\"prompts\""]),
    ):  # fmt: skip
        jobs.write_text(json.dumps(spec))
        rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(jobs)), capsys)
        assert rc == 2 and all(m in err for m in messages), (spec, err)
        assert jobs.read_text() == json.dumps(spec) and not (tmp_path / "o").exists()


# -- training that goes non-finite, resume ----------------------------------------------------------


def test_training_that_goes_non_finite_stops_at_that_step(world, tmp_path, monkeypatch, capsys):
    real, calls = trainer.micro_step, []

    def nan_at_the_third(run, micro, batch):
        calls.append(micro)
        loss = real(run, micro, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer, "micro_step", nan_at_the_third)
    out = tmp_path / "nan.safetensors"
    rc, err = run(trainer.main, _train(world, out, "--steps", "4", "--resolution", "16"), capsys)
    assert rc == 2 and "error: The loss became nan at step 3" in err and "no adapter was written" in err, err
    assert "nan_run/checkpoint-0000002" in err and "Likely cause: --lr 0.0001 too high" in err
    assert not out.exists() and sorted(os.listdir(tmp_path / "nan_run")) == ["checkpoint-0000002", "loss.csv"]
    state = train_state.load(str(tmp_path / "nan_run" / "checkpoint-0000002" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for v in state["adapter"].values())


def test_resume_compares_every_option_that_changes_training(world, trained, capsys):
    with open(trained["checkpoint"] / "trainer.json") as f:
        assert set(trainer.RESUME_SAME) <= set(json.load(f))
    before = snapshot(trained["run_dir"])
    for flags, message in (
        (["--caption-dropout", "0.5"], "trained with --caption-dropout 0.05"),
        (["--timestep-bias-multiplier", "5"], "trained with --timestep-bias-multiplier 3.0"),
        (["--timestep-bias-portion", "0.2"], "trained with --timestep-bias-portion 0.4"),
        (["--lr", "0.001"], "trained with --lr 0.0001"),
        (["--seed", "3"], "trained with --seed 0"),
    ):
        argv = _train(world, trained["out"], *RESUMED, "--resume", "latest", "--steps", "4", *flags)
        rc, err = run(trainer.main, argv, capsys)
        assert rc == 2 and message in err and "resume with the same" in err, (flags, err)
    assert snapshot(trained["run_dir"]) == before


# -- a full disk --------------------------------------------------------------------------------------


def _fills_the_disk(real, at: int):
    """``real`` (a writer taking (self?, path, ...)) that writes part of call ``at`` and fails as a full disk."""
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            path = next(a for a in args if isinstance(a, (str, os.PathLike)))
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(*args, **kwargs)

    return write


def test_a_full_disk_leaves_nothing_under_a_final_name(world, tmp_path, monkeypatch, capsys):
    """prepare, generate and train each say so in one line, and the same command then runs without --overwrite."""
    out = tmp_path / "set"
    argv = ["--src", world["photos"], "--out", str(out), "--class-word", "dog", "--resolution", "32"]
    save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", _fills_the_disk(save, at=2))  # the second photo
    rc, err = run(prep.main, argv, capsys)
    assert rc == 1 and "error: no space left on the device writing" in err and "run the same command again" in err
    assert not out.exists()
    monkeypatch.setattr(Image.Image, "save", _fills_the_disk(save, at=1))
    rc, err = run(gen.main, _gen(world, tmp_path / "images", *_subject(world)), capsys)
    assert rc == 1 and "error: no space left on the device" in err and "failed, the others go on" not in err
    assert not [n for n in os.listdir(tmp_path / "images") if n.endswith(".png")]
    monkeypatch.undo()
    assert run(prep.main, argv, capsys)[0] == 0 and sorted(os.listdir(tmp_path)) == ["images", "set"]
    assert run(gen.main, _gen(world, tmp_path / "images", *_subject(world)), capsys)[0] == 0
    assert sorted(os.listdir(tmp_path / "images")) == ["0000_photo_0_0.png", "manifest.csv"]

    monkeypatch.setattr(train_state, "save", _fills_the_disk(train_state.save, at=1))
    adapter = tmp_path / "a.safetensors"
    argv = _train(world, adapter, "--steps", "1", "--checkpoint-every", "1", "--resolution", "16")
    rc, err = run(trainer.main, argv, capsys)
    assert rc == 1 and "error: no space left on the device writing" in err and "--resume latest" in err
    assert not adapter.exists() and trainer.checkpoints(str(tmp_path / "a_run")) == []
    monkeypatch.undo()
    rc, err = run(trainer.main, argv, capsys)
    assert rc == 0 and adapter.exists(), err
    assert sorted(os.listdir(tmp_path / "a_run")) == ["checkpoint-0000001", "loss.csv"]


# -- prepare --------------------------------------------------------------------------------------------


def test_prepare_refuses_deep_folders_links_and_unbound_names(tmp_path, capsys):
    src = pathlib.Path(make_photos(str(tmp_path / "src"), count=2))
    photo = src / "photo_0.png"
    argv = ["--src", str(src), "--out", str(tmp_path / "o"), "--class-word", "dog"]

    def refused(message):
        before = snapshot(src)
        rc, err = run(prep.main, argv, capsys)
        assert rc == 2 and message in err, err
        assert snapshot(src) == before and not (tmp_path / "o").exists()

    (src / "rex" / "older").mkdir(parents=True)
    shutil.copy(photo, src / "rex" / "older" / "1.png")
    refused("has photos two folders deep (rex/older/)")
    shutil.rmtree(src / "rex")
    (src / "loop").symlink_to(src)
    refused("holds symbolic links (loop)")
    (src / "loop").unlink()
    shutil.copy(photo, tmp_path / "outside.png")
    (src / "elsewhere.png").symlink_to(tmp_path / "outside.png")
    refused("holds symbolic links (elsewhere.png)")
    (src / "elsewhere.png").unlink()
    (src / "photo_0.json").write_text(json.dumps({"subjects": {"dog": "rex", "cat": "tom"}}))
    refused("names 'cat', which the caption of photo_0 lacks (it holds dog)")
    (src / "photo_0.json").unlink()
    (src / "photo_0.txt").write_text("a dog and a cat")
    (src / "photo_0.json").write_text(json.dumps({"subjects": {"dog": "rex", "cat": "tom"}}))
    argv[-1:] = ["dog", "cat", "--keep-captions"]
    (src / "photo_1.txt").write_text("a dog")
    refused("photo_0.png shows several subjects (dog, cat); without --masks each would take the whole photo")
