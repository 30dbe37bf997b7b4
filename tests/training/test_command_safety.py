"""The standalone commands under bad input (issue 18): a clear message, no raw traceback, no user file changed.

Each case runs the command's main() in-process (what `python -m na_engine COMMAND` calls), reads its exit code
and stderr, and checks that the files the user had are byte for byte as they were.
"""

import hashlib
import os

import pytest
from PIL import Image
from tiny_diffusers import make_base, make_clip_vision, make_photos

from na_engine.adapter import random_adapter
from na_engine.errors import NestedAttentionError, command_line
from na_engine.formats import save_adapter
from na_engine.layers import diffusers_layers
from na_engine.standalone import generate as gen
from na_engine.standalone import prepare as prep
from na_engine.standalone import train as trainer


def snapshot(folder) -> dict:
    """Every file under folder -> the hash of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def run(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a command's main; argparse's own refusals exit 2 with their message too."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from na_engine.families.unet import unet_config
    from na_engine.standalone.models import clip_vision_width, fresh_config

    root = tmp_path_factory.mktemp("safety")
    base, vision = make_base(str(root / "base")), make_clip_vision(str(root / "vision"))
    unet = unet_config(base)
    adapter = str(root / "adapter.safetensors")
    resampler = fresh_config(unet["cross_attention_dim"], clip_vision_width(vision), tokens=4, depth=1)
    save_adapter(random_adapter(resampler, diffusers_layers(unet), seed=1), adapter)
    photos = make_photos(str(root / "photos"), count=2)
    return {
        "base": base,
        "vision": vision,
        "photos": photos,
        "adapter": adapter,
        "root": root,
    }


# -- the error path ---------------------------------------------------------------------------


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(capsys):
    @command_line
    def main(argv):
        raise RuntimeError("boom")

    rc, err = run(main, ["--x"], capsys)
    assert rc == 1 and "error: RuntimeError: boom" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug"])

    @command_line
    def missing(argv):
        open("/nonexistent/folder/file.txt", "w")

    rc, err = run(missing, [], capsys)
    assert rc == 1 and "No such file or directory: /nonexistent/folder/file.txt" in err


# -- prepare ----------------------------------------------------------------------------------


def test_prepare_never_writes_into_the_photos_or_a_folder_holding_files(tmp_path, capsys):
    src = make_photos(str(tmp_path / "src"), count=2)
    before = snapshot(src)
    for out in (src, os.path.join(src, "crops")):
        rc, err = run(prep.main, ["--src", src, "--out", out, "--class-word", "dog"], capsys)
        assert rc == 2 and "photo folder" in err, err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, err = run(prep.main, ["--src", src, "--out", str(busy), "--class-word", "dog"], capsys)
    assert rc == 2 and "already holds 1 files" in err and "--overwrite" in err
    rc, _ = run(prep.main, ["--src", src, "--out", str(busy), "--class-word", "dog", "--overwrite"], capsys)
    assert rc == 0 and (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    rc, err = run(prep.main, ["--src", src, "--out", str(tmp_path / "afile"), "--class-word", "dog"], capsys)
    assert rc == 2 and "is a file" in err
    rc, err = run(
        prep.main, ["--src", src, "--out", str(tmp_path / "o"), "--class-word", "dog", "--resolution", "0"], capsys
    )
    assert rc == 2 and "--resolution: must be at least 8" in err
    assert snapshot(src) == before and (tmp_path / "afile").read_text() == "x"


# -- train ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(world):
    data = str(world["root"] / "data")
    prep.prepare(world["photos"], data, "dog", resolution=32)
    return data


def _train(world, data, out, *more):
    return [
        "--base", world["base"], "--clip-vision", world["vision"], "--data", data, "--out", str(out),
        "--steps", "1", "--batch-size", "1", "--tokens", "4", "--resampler-depth", "1", *more,
    ]  # fmt: skip


def test_train_refuses_what_cannot_learn_before_loading(world, prepared, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    for flags, message in (
        (["--steps", "0"], "--steps 0"),
        (["--steps", "-3"], "--steps -3"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0"),
        (["--seed", "abc"], "--seed: expected a whole number"),
        (["--seed", str(2**70)], "below 2**63"),
    ):
        rc, err = run(trainer.main, _train(world, prepared, out, *flags), capsys)
        assert rc == 2 and message in err, (flags, err)
    out.write_bytes(b"an adapter the user keeps")
    rc, err = run(trainer.main, _train(world, prepared, out), capsys)
    assert rc == 2 and "already exists" in err and out.read_bytes() == b"an adapter the user keeps"


def test_train_refuses_captions_without_the_word_and_corrupt_images(world, tmp_path, capsys):
    data = str(tmp_path / "data")
    prep.prepare(world["photos"], data, "dog", resolution=32)
    for name in ("photo_0", "photo_1"):
        with open(os.path.join(data, name + ".txt"), "w") as f:
            f.write("a photo of a cat")
    rc, err = run(trainer.main, _train(world, data, tmp_path / "b.safetensors"), capsys)
    assert rc == 2 and "No caption" in err and "dog" in err
    with open(os.path.join(data, "photo_0.txt"), "w") as f:
        f.write("a photo of a dog")
    with open(os.path.join(data, "photo_1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    rc, err = run(trainer.main, _train(world, data, tmp_path / "b.safetensors"), capsys)
    assert rc == 2 and "cannot be read: photo_1.png" in err
    assert not (tmp_path / "b.safetensors").exists()


# -- generate ---------------------------------------------------------------------------------


def _gen(world, out, *more):
    return [
        "--base", world["base"], "--adapter", world["adapter"], "--clip-vision", world["vision"],
        "--steps", "1", "--size", "32", "--no-maps", "--out", str(out), *more,
    ]  # fmt: skip


def test_a_catalogue_is_checked_whole_before_anything_loads(world, tmp_path, capsys):
    photo = os.path.join(world["photos"], "photo_0.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "prompt,subject,trigger,seed\n"
        f"a dog,{photo},dog,abc\n"
        f"a dog,{photo},dog,1.0\n"
        f"a dog,{photo},dog,{2**70}\n"
        f"a dog,{photo},dog\n"
        f"a dog,missing.png,dog,1\n"
        f"a cat,{photo},dog,1\n"
    )
    rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(jobs)), capsys)
    assert rc == 2 and "6 bad rows" in err
    for line in ("line 2: seed 'abc'", "line 3: seed '1.0'", "line 4: seed", "line 5: 4 columns expected"):
        assert line in err, (line, err)
    assert "line 6: subject: No subject images" in err and "line 7: the trigger 'dog' is not in the prompt" in err
    assert not (tmp_path / "o").exists()
    jobs.write_text("prompt,subject,trigger,seed\n")
    rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(jobs)), capsys)
    assert rc == 2 and "has a header but no rows" in err
    jobs.write_text("prompt,subject,trigger\na dog,x.png,dog\n")
    rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(jobs)), capsys)
    assert rc == 2 and "lacks seed" in err
    (tmp_path / "bad.json").write_text("{not json")
    rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(tmp_path / "bad.json")), capsys)
    assert rc == 2 and "not valid JSON" in err
    rc, err = run(gen.main, _gen(world, tmp_path / "o", "--batch", str(jobs), "--seed", "3"), capsys)
    assert rc == 2 and "--seed would be ignored" in err
    (tmp_path / "afile").write_text("x")
    rc, err = run(
        gen.main, _gen(world, tmp_path / "afile", "--prompt", "a dog", "--subject", photo, "--trigger", "dog"), capsys
    )
    assert rc == 2 and "is a file" in err


def test_a_catalogue_saved_by_a_spreadsheet_reads(world, tmp_path, capsys):
    photo = os.path.join(world["photos"], "photo_0.png")
    jobs = tmp_path / "excel.csv"
    jobs.write_bytes((f"\ufeffprompt,subject,trigger,seed\r\na dog,{photo},dog,4\r\n").encode("utf-8"))
    assert gen.read_jobs(str(jobs))[0].seed == 4


def test_a_failed_catalogue_resumes_and_never_touches_foreign_files(world, tmp_path, capsys):
    good = os.path.join(world["photos"], "photo_0.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"prompt,subject,trigger,seed\na dog,{good},dog,1\na dog,{broken},dog,2\na dog,{good},dog,3\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png.partial").write_bytes(b"not the catalogue's")
    rc, err = run(gen.main, _gen(world, out, "--batch", str(jobs)), capsys)
    assert rc == 2 and "1 of 3 rows failed" in err and "row 2" in err
    assert {"0000_photo_0_1.png", "0002_photo_0_3.png"} <= set(os.listdir(out))
    assert (out / "keep.png.partial").read_bytes() == b"not the catalogue's"
    rendered = snapshot(out)
    Image.open(good).save(broken)  # the user fixes the photo and runs the same command again
    rc, err = run(gen.main, _gen(world, out, "--batch", str(jobs)), capsys)
    assert rc == 0
    after = snapshot(out)
    assert after["0000_photo_0_1.png"] == rendered["0000_photo_0_1.png"] and "0001_broken_2.png" in after
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 4 and manifest[2].startswith("0001_broken_2.png")
    other = tmp_path / "other"
    other.mkdir()
    (other / "0000_photo_0_1.png").write_bytes(b"a user's image")
    rc, err = run(gen.main, _gen(world, other, "--batch", str(jobs)), capsys)
    assert rc == 2 and "did not write" in err and (other / "0000_photo_0_1.png").read_bytes() == b"a user's image"


def test_interrupted_catalogue_keeps_its_finished_rows(world, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the second row is being recorded: the first is in the manifest, so the next run renders only
    the second (and removes the half-written file the interrupted row left)."""
    good = os.path.join(world["photos"], "photo_0.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"prompt,subject,trigger,seed\na dog,{good},dog,1\na dog,{good},dog,2\n")
    out = tmp_path / "out"
    real, rows = gen._append_manifest, []

    def interrupt_the_second(folder, row):
        rows.append(row[0])
        if len(rows) == 2:
            raise KeyboardInterrupt
        real(folder, row)

    monkeypatch.setattr(gen, "_append_manifest", interrupt_the_second)
    rc, err = run(gen.main, _gen(world, out, "--batch", str(jobs)), capsys)
    assert rc == 130 and "interrupted" in err
    assert sorted(os.listdir(out)) == ["0000_photo_0_1.png", "0001_photo_0_2.png.partial", "manifest.csv"]
    rows.clear()
    monkeypatch.setattr(gen, "_append_manifest", lambda folder, row: (rows.append(row[0]), real(folder, row)))
    rc, _ = run(gen.main, _gen(world, out, "--batch", str(jobs)), capsys)
    assert rc == 0 and rows == ["0001_photo_0_2.png"]
    assert sorted(os.listdir(out)) == ["0000_photo_0_1.png", "0001_photo_0_2.png", "manifest.csv"]


def test_study_run_names_an_unusable_out(tmp_path, capsys):
    from study.run import main

    (tmp_path / "file").write_text("x")
    rc, err = run(main, ["run", "--quick", "--out", str(tmp_path / "file" / "run")], capsys)
    assert rc == 1 and "error:" in err and (tmp_path / "file").read_text() == "x"


def test_errors_are_nested_attention_errors():
    with pytest.raises(NestedAttentionError):
        gen.read_jobs("/nonexistent.csv")


def test_base_images_need_no_subject_nor_adapter(world, tmp_path, capsys):
    """The base's own image of a prompt, for comparison shots: without --subject, --trigger or --adapter."""
    argv = ["--base", world["base"], "--clip-vision", world["vision"], "--steps", "1", "--size", "32"]
    rc, err = run(gen.main, [*argv, "--prompt", "a dog", "--seed", "4", "--out", str(tmp_path / "one")], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "one")) == ["0000_base_4.png", "manifest.csv"]
    photo = os.path.join(world["photos"], "photo_0.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"prompt,subject,trigger,seed\na dog,,,1\na dog,{photo},dog,2\n")
    rc, err = run(gen.main, [*argv, "--batch", str(jobs), "--out", str(tmp_path / "two")], capsys)
    assert rc == 2 and "need --adapter" in err
    rc, err = run(
        gen.main, [*argv, "--adapter", world["adapter"], "--batch", str(jobs), "--out", str(tmp_path / "two")], capsys
    )
    assert rc == 0, err
    assert {"0000_base_1.png", "0001_photo_0_2.png", "0001_photo_0_2.maps.png"} <= set(os.listdir(tmp_path / "two"))


def test_a_row_that_fails_under_new_settings_stays_the_catalogues_own(world, tmp_path, capsys):
    """Settings changed, one row failing: its older image is still listed, so the next run retries it instead of
    refusing it as a foreign file."""
    good = os.path.join(world["photos"], "photo_0.png")
    photo = tmp_path / "p.png"
    Image.open(good).save(photo)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"prompt,subject,trigger,seed\na dog,{good},dog,1\na dog,{photo},dog,2\n")
    out = tmp_path / "out"
    assert run(gen.main, _gen(world, out, "--batch", str(jobs)), capsys)[0] == 0
    photo.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc, err = run(gen.main, _gen(world, out, "--batch", str(jobs), "--cfg", "2"), capsys)
    assert rc == 2 and "1 of 2 rows failed" in err
    Image.open(good).save(photo)
    rc, err = run(gen.main, _gen(world, out, "--batch", str(jobs), "--cfg", "2"), capsys)
    assert rc == 0, err
    rows = (out / "manifest.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["0000_photo_0_1.png", "0001_p_2.png"]


def test_prepare_never_writes_into_the_masks_and_names_never_collide(tmp_path, capsys):
    src = make_photos(str(tmp_path / "src"), count=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (48, 48), 255).save(masks / "photo_0.png")
    before = snapshot(masks)
    rc, err = run(
        prep.main,
        ["--src", src, "--out", str(masks), "--class-word", "dog", "--masks", str(masks), "--overwrite"],
        capsys,
    )
    assert rc == 2 and "mask folder" in err and snapshot(masks) == before
    os.makedirs(os.path.join(src, "a"))
    Image.open(os.path.join(src, "photo_0.png")).save(os.path.join(src, "a", "b.png"))
    Image.open(os.path.join(src, "photo_0.png")).save(os.path.join(src, "a__b.png"))
    rc, err = run(prep.main, ["--src", src, "--out", str(tmp_path / "o"), "--class-word", "dog"], capsys)
    assert rc == 2 and "a/b.png and" in err and "a__b.png." in err
