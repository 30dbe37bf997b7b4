"""What current ComfyUI's frontend fetches for this pack, fetched from a real server the way the frontend
builds each URL (comfyui_frontend_package 1.27): the templates and their thumbnails, and each node's
help page for the docs panel. A headless browser is not used; see README's Development section.

    GET /workflow_templates                                   {pack folder: [template names]}
    GET /api/workflow_templates/<pack>/<name>.json | .jpg     the template and its thumbnail
    GET /extensions/<pack>/docs/<NodeType>/<locale>.md        the help page, else .../docs/<NodeType>.md
"""

import glob
import json
import os
import re
import urllib.error
import urllib.request

import pytest
from conftest import require_comfy

pytestmark = pytest.mark.server

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # nodes the frontend draws, not the server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = require_comfy()
    if not os.path.isfile(os.path.join(root, "app", "custom_node_manager.py")):
        pytest.skip("this ComfyUI serves no templates or node help pages (current ComfyUI does)")
    from comfy_server import ComfyServer

    srv = ComfyServer(str(tmp_path_factory.mktemp("models")), extra_args=["--verbose", "DEBUG"])
    srv.start()
    yield srv
    srv.cleanup()


def _fetch(srv, path):
    try:
        with urllib.request.urlopen(srv.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_no_rename_hint_in_the_debug_log(server):
    from comfy_server import PACK_NAME

    log = server.log_tail(100000)
    assert "Trying to load custom node" in log, "the server did not log at DEBUG level:\n" + log[-3000:]
    hints = [line for line in log.splitlines() if "consider renaming" in line and PACK_NAME in line]
    assert not hints, hints


def test_templates_and_thumbnails_are_served(server):
    from comfy_server import PACK_NAME

    listed = server.get("/workflow_templates")
    names = [os.path.basename(p)[: -len(".json")] for p in WORKFLOWS]
    assert sorted(listed.get(PACK_NAME, [])) == names, listed
    for name in names:
        status, _, body = _fetch(server, "/api/workflow_templates/%s/%s.json" % (PACK_NAME, name))
        assert status == 200 and json.loads(body) == json.loads(
            _read(os.path.join(REPO, "example_workflows", name + ".json"))
        )
        status, kind, body = _fetch(server, "/api/workflow_templates/%s/%s.jpg" % (PACK_NAME, name))
        assert status == 200 and kind == "image/jpeg", (name, status, kind)
        assert body == _read(os.path.join(REPO, "example_workflows", name + ".jpg"))


def test_every_node_of_every_template_is_registered(server):
    """What the frontend's 'missing nodes' dialog checks when a template opens: each type in object_info."""
    info = server.object_info()
    for path in WORKFLOWS:
        with open(path) as f:
            types = {n["type"] for n in json.load(f)["nodes"]} - FRONTEND_ONLY
        assert not sorted(types - set(info)), (os.path.basename(path), sorted(types - set(info)))


def test_each_node_help_page_is_served_where_the_docs_panel_asks(server):
    from comfy_server import PACK_NAME

    info = server.object_info()
    ours = {name: spec for name, spec in info.items() if spec.get("python_module") == "custom_nodes." + PACK_NAME}
    assert len(ours) == 7, sorted(ours)
    base = "/extensions/%s/docs/" % PACK_NAME  # the panel's base for the page and its relative pictures
    for name in ours:
        local = os.path.join(REPO, "web", "docs")
        for locale in ("en", "zh"):
            status, _, body = _fetch(server, base + "%s/%s.md" % (name, locale))
            page = os.path.join(local, name, locale + ".md")
            if os.path.isfile(page):
                assert status == 200 and body == _read(page), (name, locale, status)
            else:  # the panel's fallback
                assert status == 404, (name, locale, status)
                status, _, body = _fetch(server, base + name + ".md")
                assert status == 200 and body == _read(os.path.join(local, name + ".md")), (name, status)
            for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", body.decode("utf-8")):
                status, kind, _ = _fetch(server, base + src)
                assert status == 200 and kind.startswith("image/"), (name, src, status, kind)
