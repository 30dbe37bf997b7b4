"""python -m na_engine.standalone.prepare: squares, captions, masks, skipped files, caption errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from tiny_diffusers import make_photos

from na_engine.errors import NestedAttentionError
from na_engine.standalone.prepare import prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_squares_captions_and_report(tmp_path):
    src = make_photos(str(tmp_path / "src"), count=3)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"not a jpeg")
    record = prepare(src, str(tmp_path / "out"), "bottle", resolution=24, mode="pad")
    assert record["items"] == ["photo_0", "photo_1", "photo_2"]
    assert [s["file"] for s in record["skipped"]] == ["broken.jpg"] and "unreadable" in record["skipped"][0]["reason"]
    for name in record["items"]:
        assert Image.open(tmp_path / "out" / f"{name}.png").size == (24, 24)
        assert (tmp_path / "out" / f"{name}.txt").read_text() == "a photo of a bottle"
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["class_word"] == "bottle"


def test_own_captions_and_masks(tmp_path):
    src = make_photos(str(tmp_path / "src"), count=2)
    (tmp_path / "src" / "photo_0.txt").write_text("a red bottle on the beach")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        w, h = Image.open(tmp_path / "src" / f"photo_{i}.png").size
        Image.new("L", (w, h), 255).save(masks / f"photo_{i}.png")
    record = prepare(src, str(tmp_path / "out"), "bottle", resolution=16, keep_captions=True, masks=str(masks))
    assert (tmp_path / "out" / "photo_0.txt").read_text() == "a red bottle on the beach"
    assert (tmp_path / "out" / "photo_1.txt").read_text() == "a photo of a bottle"
    assert Image.open(tmp_path / "out" / "photo_1.mask.png").size == (16, 16) and len(record["items"]) == 2


def test_caption_without_class_word_names_the_file(tmp_path):
    src = make_photos(str(tmp_path / "src"), count=2)
    (tmp_path / "src" / "photo_1.txt").write_text("a photo of a bottleneck")
    with pytest.raises(NestedAttentionError, match=r"photo_1\.png.*'bottle'"):
        prepare(src, str(tmp_path / "out"), "bottle", keep_captions=True)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_and_skips(tmp_path):
    src = make_photos(str(tmp_path / "src"), count=1)
    (tmp_path / "src" / "bad.png").write_bytes(b"\x89PNG broken")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "na_engine", "prepare", *a], cwd=REPO, capture_output=True, text=True
        )

    ok = run("--src", src, "--out", str(tmp_path / "out"), "--class-word", "dog", "--resolution", "16")
    assert ok.returncode == 0 and "skipped 1" in ok.stdout and "bad.png" in ok.stdout
    bad = run("--src", src, "--out", str(tmp_path / "o2"), "--class-word", "dog", "--template", "a photo")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "{class}" in bad.stderr


def test_several_class_words_give_each_item_its_trigger(tmp_path):
    """One training set over several kinds: each caption holds exactly one of the class words."""
    src = make_photos(str(tmp_path / "src"), count=3)
    for i, caption in enumerate(["a bottle on a table", "a dog in snow", "a red bottle"]):
        (tmp_path / "src" / f"photo_{i}.txt").write_text(caption)
    record = prepare(src, str(tmp_path / "out"), ["bottle", "dog"], resolution=16, keep_captions=True)
    assert record["triggers"] == ["bottle", "dog", "bottle"] and record["class_words"] == ["bottle", "dog"]
    (tmp_path / "src" / "photo_2.txt").write_text("a bottle and a dog")
    with pytest.raises(NestedAttentionError, match=r"photo_2\.png.*holds \['bottle', 'dog'\]"):
        prepare(src, str(tmp_path / "out2"), ["bottle", "dog"], keep_captions=True)
    with pytest.raises(NestedAttentionError, match="need --keep-captions"):
        prepare(src, str(tmp_path / "out3"), ["bottle", "dog"])
    os.remove(tmp_path / "src" / "photo_2.txt")
    with pytest.raises(NestedAttentionError, match=r"photo_2\.png has no caption file"):
        prepare(src, str(tmp_path / "out4"), ["bottle", "dog"], keep_captions=True)
