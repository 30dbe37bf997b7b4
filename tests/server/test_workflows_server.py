"""Every example graph in example_workflows/ runs on a real ComfyUI server through comfy-cli.

One server per test module (so per ComfyUI version: run once with the default 2024 copy and once
with COMFYUI_PATH=<current ComfyUI>). Models are random-weight files with the real names the
workflows use (tests/fixtures_models.py: populate_workflows), generated once into
$NA_CACHE/models (or NA_MODELS_DIR) and reused; the input photos go into the server's input dir.
The SDXL file here is the KOALA_700M-shaped fixture (22 cross-attention layers); the real 70-layer
SDXL table is covered in-process (tests/comfy/test_nodes_inprocess.py).
"""

import copy
import glob
import json
import os
import struct
import time

import pytest
from conftest import require_comfy

pytestmark = pytest.mark.server

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
OUR_NODES = (
    "NestedAttentionLoader",
    "NestedSubjectEncoder",
    "NestedMultiSubjectCombine",
    "NestedAttentionApply",
    "NestedAttentionMapPreview",
    "NestedSubjectSave",
    "NestedSubjectLoad",
)
# workflow -> {SaveImage filename_prefix: (number of images, (width, height))}, run test-sized (1/8)
EXPECTED = {
    "01_single_subject_sdxl.json": {"na_01_single": (1, (128, 128))},
    "02_two_subjects_person_and_dog.json": {"na_02_two_subjects": (1, (128, 128))},
    "03_ip_adapter_plus_bridge_sd15.json": {"na_03_ipadapter_bridge": (1, (64, 64))},
    "04_chain_upscale_inpaint.json": {"na_04_chain_base": (1, (128, 128)), "na_04_chain_inpaint": (1, (256, 256))},
    "05_attention_map_preview.json": {"na_05_attention": (1, (128, 128))},
}
# Checked against the schemas of a server that has Flux (current ComfyUI), never run: ComfyUI builds Flux's
# T5-XXL at full size (4.7 B parameters) whatever the file holds. The Patch on Flux runs in-process instead
# (tests/comfy/test_flux_patch.py, on a tiny Flux-architecture model).
SCHEMA_ONLY = {"06_flux_single_subject.json": "FluxGuidance"}  # -> a node only a Flux-capable server lists
TIMES = {}


def _models_dir():
    return os.environ.get("NA_MODELS_DIR") or os.path.join(
        os.environ.get("NA_CACHE") or os.path.expanduser("~/.cache/nested-attention"), "models"
    )


@pytest.fixture(scope="module")
def models_dir():
    require_comfy()
    import fixtures_models

    t0 = time.time()
    fixtures_models.populate_workflows(_models_dir(), WORKFLOWS)
    TIMES["fixtures"] = time.time() - t0
    return _models_dir()


@pytest.fixture(scope="module")
def server(models_dir):
    import fixtures_models
    from comfy_server import ComfyServer

    t0 = time.time()
    # fp32 text/vision encoders: about 2x faster than ComfyUI's fp16 default on CPU
    srv = ComfyServer(models_dir, extra_args=["--fp32-text-enc"])
    srv.start()
    TIMES["server start"] = time.time() - t0
    fixtures_models.make_input_images(os.path.join(srv.tmp, "input"))
    yield srv
    srv.cleanup()
    print("\n[workflows] wall times (s): " + ", ".join("%s %.1f" % kv for kv in TIMES.items()))


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _history_images(srv, prompt_id):
    """[(node class, image dict)] of a finished prompt, from /history."""
    entry = srv.get("/history/%s" % prompt_id)[prompt_id]
    prompt = entry["prompt"][2]
    return [
        (prompt[node]["class_type"], img) for node, out in entry["outputs"].items() for img in out.get("images", [])
    ]


def _run(srv, path):
    res = srv.run_workflow(path)
    assert res["returncode"] == 0 and res["status"] == "completed", "%s\n--- server log ---\n%s" % (
        res["raw"][-4000:],
        srv.log_tail(),
    )
    return res


def _widget_inputs(spec):
    return [
        name
        for section in ("required", "optional")
        for name, s in spec["input"].get(section, {}).items()
        if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
    ]


def test_server_lists_our_nodes(server):
    info = server.object_info()
    missing = [n for n in OUR_NODES if n not in info]
    assert not missing, "%s\n%s" % (missing, server.log_tail(80))


def test_workflow_nodes_match_server_schemas(server):
    """Each node type exists; its sockets and its number of widget values match INPUT_TYPES."""
    info = server.object_info()
    assert len(WORKFLOWS) == 6
    for path in WORKFLOWS:
        needs = SCHEMA_ONLY.get(os.path.basename(path))
        if needs and needs not in info:
            assert not _has_flux(), (path, needs)  # only the 2024 ComfyUI may lack it
            continue
        wf = json.load(open(path))
        ids = {n["id"] for n in wf["nodes"]}
        assert wf["last_node_id"] == max(ids) and wf["last_link_id"] == len(wf["links"]), path
        assert any(n["type"] == "Note" for n in wf["nodes"]), path
        for n in wf["nodes"]:
            if n["type"] == "Note":
                continue
            spec = info[n["type"]]
            widgets = _widget_inputs(spec)
            sockets = [
                name for s in ("required", "optional") for name in spec["input"].get(s, {}) if name not in widgets
            ]
            assert [i["name"] for i in n["inputs"]] == sockets, (path, n["type"])
            extra = ("seed" in widgets) + (n["type"] == "LoadImage")  # control_after_generate, upload
            assert len(n["widgets_values"]) == len(widgets) + extra, (path, n["type"], n["widgets_values"])
            for i, name in enumerate(widgets):
                choices = spec["input"].get("required", {}).get(name, spec["input"].get("optional", {}).get(name))[0]
                value = n["widgets_values"][i + (i > widgets.index("seed") if "seed" in widgets else 0)]
                if isinstance(choices, list):
                    assert value in choices, (path, n["type"], name, value)


def _has_flux():
    from comfy_harness import has_flux

    return has_flux()


@pytest.mark.parametrize("name", [os.path.basename(p) for p in WORKFLOWS if os.path.basename(p) not in SCHEMA_ONLY])
def test_workflow_runs(server, name, tmp_path):
    from comfy_server import test_sized

    t0 = time.time()
    res = _run(server, test_sized(os.path.join(REPO, "example_workflows", name), str(tmp_path)))
    TIMES[name[:2]] = time.time() - t0
    images = _history_images(server, res["prompt_id"])
    saved = [img for cls, img in images if cls == "SaveImage"]
    for prefix, (count, size) in EXPECTED[name].items():
        files = [img for img in saved if img["filename"].startswith(prefix)]
        assert len(files) == count, (prefix, saved)
        for img in files:
            path = server.file_path(img["type"], img["subfolder"], img["filename"])
            assert _png_size(path) == size, path
    assert len(saved) == sum(c for c, _ in EXPECTED[name].values()), saved
    previews = [img for cls, img in images if cls == "NestedAttentionMapPreview"]
    if name.startswith("05"):
        assert previews, images
        for img in previews:
            path = server.file_path(img["type"], img["subfolder"], img["filename"])
            w, h = _png_size(path)
            assert w >= 128 and h >= 128, (path, w, h)
    else:
        assert not previews


def test_missing_trigger_word_fails_clearly_and_server_survives(server, tmp_path):
    from comfy_server import test_sized

    wf = json.load(
        open(test_sized(os.path.join(REPO, "example_workflows", "01_single_subject_sdxl.json"), str(tmp_path)))
    )
    patch = next(n for n in wf["nodes"] if n["type"] == "NestedAttentionApply")
    bad = copy.deepcopy(wf)
    next(n for n in bad["nodes"] if n["id"] == patch["id"])["widgets_values"][0] = "a photo of a cat on the moon"
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    res = server.run_workflow(str(bad_path))
    assert res["status"] != "completed", res
    assert "The trigger word 'person' is not in the prompt" in res["raw"], res["raw"][-4000:]
    assert server.proc.poll() is None, server.log_tail()
    good = copy.deepcopy(wf)
    next(n for n in good["nodes"] if n["type"] == "KSampler")["widgets_values"][0] += 1  # not served from cache
    good_path = tmp_path / "good.json"
    good_path.write_text(json.dumps(good))
    res = _run(server, str(good_path))
    assert [os.path.basename(p).startswith("na_01_single") for p in res["outputs"]] == [True], res["outputs"]
