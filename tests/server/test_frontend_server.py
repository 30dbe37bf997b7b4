"""This pack in current ComfyUI's frontend (comfyui_frontend_package 1.27), against a real server.

Over HTTP, each URL built as the frontend builds it:
    GET /workflow_templates                                   {pack folder: [template names]}
    GET /api/workflow_templates/<pack>/<name>.json | .jpg     the template and its thumbnail
    GET /extensions/<pack>/docs/<NodeType>/<locale>.md        the help page, else .../docs/<NodeType>.md
and in the real frontend, in headless Chromium (skipped where none is installed: apt-get install chromium,
or NA_CHROMIUM=path): each template found in the template browser, shown with its thumbnail and opened by a
click with no missing-nodes warning; each node's help page shown in the docs panel, in English and Chinese.
"""

import glob
import json
import os
import re
import time
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


# ---------------------------------------------------------------- the real frontend, in headless Chromium
DIALOGS = "[...document.querySelectorAll('.p-dialog')].map(d => d.innerText)"
CLOSE_DIALOGS = "(() => { document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach(b => b.click()); })()"


@pytest.fixture(scope="module")
def browser(server):
    from headless_chromium import BrowserMissing, HeadlessChromium

    try:
        chromium = HeadlessChromium()
    except BrowserMissing as e:
        pytest.skip(str(e))
    with chromium:
        chromium.open(server.url)
        chromium.wait_for("!!(window.app && app.graph && LiteGraph.registered_node_types.NestedAttentionApply)", 120)
        yield chromium


def _template_dialog(browser):
    if not browser.evaluate("!!document.querySelector('[data-testid=template-workflows-content]')"):
        browser.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    browser.wait_for("!!document.querySelector('[data-testid=template-workflows-content] input')")


def test_a_missing_node_shows_the_frontends_warning(browser):
    """The control for the next test: the dialog it looks for does appear for a node type nobody registered."""
    browser.evaluate(CLOSE_DIALOGS)
    browser.wait_for("!document.querySelector('.p-dialog')", 10)
    graph = {"last_node_id": 1, "last_link_id": 0, "nodes": [{"id": 1, "type": "NoSuchNodeType", "pos": [0, 0],
             "size": [200, 60], "flags": {}, "order": 0, "mode": 0, "properties": {}}], "links": [], "groups": [],
             "config": {}, "extra": {}, "version": 0.4}  # fmt: skip
    browser.evaluate("app.loadGraphData(%s)" % json.dumps(graph))
    assert "NoSuchNodeType" in "".join(browser.wait_for(DIALOGS, 15))
    browser.evaluate(CLOSE_DIALOGS)


@pytest.mark.parametrize("name", [os.path.basename(p)[: -len(".json")] for p in WORKFLOWS])
def test_template_opens_from_the_template_browser_without_missing_nodes(browser, name):
    """Found by name in the template browser, shown with its thumbnail, opened by a click."""
    browser.evaluate(CLOSE_DIALOGS)
    _template_dialog(browser)
    search = "document.querySelector('[data-testid=template-workflows-content] input')"
    browser.evaluate(
        "(i => { i.value = %s; i.dispatchEvent(new Event('input', {bubbles: true})); })(%s)"
        % (json.dumps(name), search)
    )
    card = "document.querySelector('[data-testid=\"template-workflow-%s\"]')" % name
    width = browser.wait_for("(c => c && c.querySelector('img') && c.querySelector('img').naturalWidth)(%s)" % card, 30)
    assert width == 400, width  # the thumbnail loaded
    browser.evaluate(card + ".click()")
    with open(os.path.join(REPO, "example_workflows", name + ".json")) as f:
        count = len(json.load(f)["nodes"])
    browser.wait_for(
        "!document.querySelector('[data-testid=template-workflows-content]') && app.graph._nodes.length == %d" % count,
        30,
    )
    time.sleep(1.5)  # a missing-nodes warning opens right after the graph loads
    assert browser.evaluate(DIALOGS) == []
    broken = browser.evaluate(
        "app.graph._nodes.filter(n => n.has_errors || !LiteGraph.registered_node_types[n.type]).map(n => n.type)"
    )
    assert broken == []


def _open_help(browser, node_type):
    browser.evaluate(
        "(() => { const n = LiteGraph.createNode(%s); app.graph.add(n); app.canvas.deselectAll();"
        " app.canvas.selectNode(n); app.canvas.setDirty(true, true); })()" % json.dumps(node_type)
    )
    browser.wait_for("!!document.querySelector('[data-testid=info-button]')", 15)
    browser.evaluate("document.querySelector('[data-testid=info-button]').click()")


def _panel(browser, heading):
    """The docs panel's text once it shows `heading`, and the natural widths of its pictures once loaded."""
    text = browser.wait_for(
        "(e => e && e.innerText.includes(%s) && e.innerText)(document.querySelector('.node-help-content'))"
        % json.dumps(heading),
        20,
    )
    widths = browser.wait_for(
        "(imgs => imgs.length && imgs.every(i => i.complete) && imgs.map(i => i.naturalWidth))"
        "([...document.querySelector('.node-help-content').querySelectorAll('img')])",
        20,
    )
    return text, widths


@pytest.mark.parametrize("locale", ["en", "zh"])
def test_docs_panel_shows_each_nodes_page(browser, server, locale):
    """Node selected, the selection toolbox's info button clicked: the panel shows our page and its picture."""
    browser.evaluate(CLOSE_DIALOGS)
    browser.evaluate("app.graph.clear()")
    browser.evaluate("app.extensionManager.setting.set('Comfy.Locale', %s)" % json.dumps(locale))
    from comfy_server import PACK_NAME

    ours = [n for n, spec in server.object_info().items() if spec.get("python_module") == "custom_nodes." + PACK_NAME]
    assert len(ours) == 7, ours
    docs = os.path.join(REPO, "web", "docs")
    for node_type in ours:
        page = os.path.join(docs, node_type, locale + ".md")
        page = page if os.path.isfile(page) else os.path.join(docs, node_type + ".md")
        with open(page, encoding="utf-8") as f:
            heading = f.readline().lstrip("# ").strip()
        _open_help(browser, node_type)
        text, widths = _panel(browser, heading)
        assert heading in text and all(widths), (node_type, locale, widths)
    browser.evaluate("app.extensionManager.setting.set('Comfy.Locale', 'en')")
