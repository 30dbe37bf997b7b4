"""Real ComfyUI server + comfy-cli: core-node graph on a generated random SD1.5 checkpoint.

Models are generated once into $NA_CACHE/models (or NA_MODELS_DIR) and reused.
"""

import os
import struct

import pytest
from conftest import require_comfy

pytestmark = pytest.mark.server

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def models_dir():
    require_comfy()
    import fixtures_models

    d = os.environ.get("NA_MODELS_DIR") or os.path.join(
        os.environ.get("NA_CACHE") or os.path.expanduser("~/.cache/nested-attention"), "models"
    )
    fixtures_models.populate(d, ("sd15",))
    return d


@pytest.fixture(scope="module")
def server(models_dir):
    from comfy_server import ComfyServer

    srv = ComfyServer(models_dir)
    srv.start()
    yield srv
    srv.cleanup()


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_server_lists_core_nodes_and_checkpoint(server):
    info = server.object_info()
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "VAEDecode", "SaveImage", "CLIPVisionLoader"):
        assert name in info
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "na_tiny_sd15.safetensors" in ckpts


def test_pack_imports_in_server(server):
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(HERE)), "__init__.py")):
        pytest.skip("the pack has no __init__.py yet")
    from comfy_server import PACK_NAME

    bad = [row for row in server.log_tail(2000).splitlines() if "IMPORT FAILED" in row and PACK_NAME in row]
    assert not bad, server.log_tail(200)


def test_core_workflow_via_comfy_cli(server):
    res = server.run_workflow(os.path.join(HERE, "workflows_core_smoke.json"))
    assert res["returncode"] == 0 and res["status"] == "completed", "%s\n--- server log ---\n%s" % (
        res["raw"][-4000:],
        server.log_tail(),
    )
    assert len(res["outputs"]) == 1, res
    assert os.path.basename(res["outputs"][0]).startswith("na_core_smoke")
    assert _png_size(res["outputs"][0]) == (64, 64)
