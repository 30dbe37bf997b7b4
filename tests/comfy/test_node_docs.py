"""Every node has a help page where current ComfyUI's docs panel looks (WEB_DIRECTORY/docs/<NodeType>.md,
translations in WEB_DIRECTORY/docs/<NodeType>/<locale>.md), naming each input and output of its schema,
and the pictures scripts/draw_pictures.py draws (help pages, template thumbnails, registry icon and
banner) are up to date with their sources."""

import glob
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy.import_pack()


def _docs(pack):
    return os.path.join(REPO, pack.WEB_DIRECTORY, "docs")


def _names(cls):
    inputs = cls.INPUT_TYPES()
    names = [name for section in ("required", "optional") for name in inputs.get(section, {})]
    return names + list(getattr(cls, "RETURN_NAMES", None) or ())


def _pages(pack, node_type):
    docs = _docs(pack)
    return [os.path.join(docs, node_type + ".md")] + sorted(glob.glob(os.path.join(docs, node_type, "*.md")))


def test_every_node_has_a_page_naming_each_input_and_output(pack):
    missing = {}
    for node_type, cls in pack.NODE_CLASS_MAPPINGS.items():
        for page in _pages(pack, node_type):
            if not os.path.isfile(page):
                missing[node_type] = "no page " + os.path.relpath(page, REPO)
                continue
            with open(page, encoding="utf-8") as f:
                text = f.read()
            absent = [name for name in _names(cls) if "`%s`" % name not in text]
            if absent:
                missing[os.path.relpath(page, REPO)] = absent
    assert not missing, missing


def test_translations_exist_for_the_two_most_used_nodes(pack):
    for node_type in ("NestedAttentionApply", "NestedSubjectEncoder"):
        assert os.path.isfile(os.path.join(_docs(pack), node_type, "zh.md")), node_type


def test_pages_show_pictures_that_exist(pack):
    """Relative image paths resolve against WEB_DIRECTORY/docs/ in the docs panel (for translations too)."""
    for node_type in pack.NODE_CLASS_MAPPINGS:
        for page in _pages(pack, node_type):
            with open(page, encoding="utf-8") as f:
                images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", f.read())
            assert images, page
            for src in images:
                assert not src.startswith(("/", "http", "..")), (page, src)
                assert os.path.isfile(os.path.join(_docs(pack), src)), (page, src)


def test_no_study_figures_in_tooltips(pack):
    """Tooltips speak to the person placing the node; measurements and their rounds live in the help pages."""
    for node_type, cls in pack.NODE_CLASS_MAPPINGS.items():
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                tip = spec[1].get("tooltip", "") if len(spec) > 1 and isinstance(spec[1], dict) else ""
                assert not re.search(r"study|round \d|p = |docs/", tip, re.I), (node_type, name, tip)


def test_pictures_are_up_to_date(comfy):
    """Each committed picture matches a fresh drawing from its source (workflow JSON, node schema)."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import draw_pictures
    finally:
        sys.path.remove(os.path.join(REPO, "scripts"))
    pictures = draw_pictures.pictures()
    workflows = glob.glob(os.path.join(REPO, "example_workflows", "*.json"))
    thumbs = [p for p in pictures if p.endswith(".jpg")]
    assert len(thumbs) == len(workflows) > 0
    for path in thumbs:
        assert pictures[path].size == (draw_pictures.THUMB, draw_pictures.THUMB)
    stale = [os.path.relpath(p, REPO) for p, img in pictures.items() if draw_pictures.differs(img, p)]
    assert not stale, "run python scripts/draw_pictures.py: %s" % stale
