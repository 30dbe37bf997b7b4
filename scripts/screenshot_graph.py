#!/usr/bin/env python3
"""Takes docs/graph.png, the README's picture: example workflow 01 opened in ComfyUI's real frontend,
in headless Chromium, on a CPU server with this pack installed (no model files needed: the graph is
shown, not run).

    COMFYUI_PATH=/path/to/current/ComfyUI python scripts/screenshot_graph.py [--workflow NAME] [--out PATH]

Needs a Chromium (apt-get install chromium, or NA_CHROMIUM=path) and a current ComfyUI (its frontend
package); the harness is the tests' (tests/support/comfy_server.py, headless_chromium.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
import fixtures_models  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from headless_chromium import HeadlessChromium  # noqa: E402

SIZE = (1600, 640)
PACK_FOLDER = "nested-attention"  # as comfy-cli and the README install it: the frontend shows it on our nodes
SETTINGS = {"Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1}  # no minimap; text at any zoom


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflow", default="01_single_subject_sdxl")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "graph.png"))
    a = ap.parse_args(argv)
    with open(os.path.join(REPO, "example_workflows", a.workflow + ".json")) as f:
        graph = json.load(f)
    with (
        ComfyServer(tempfile.mkdtemp(prefix="na-shot-models-"), pack_name=PACK_FOLDER) as srv,
        HeadlessChromium(size=SIZE) as browser,
    ):
        fixtures_models.make_input_images(os.path.join(srv.tmp, "input"))  # the photo LoadImage previews
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1], deviceScaleFactor=1, mobile=False
        )
        browser.open(srv.url)
        browser.wait_for("!!(window.app && app.graph && LiteGraph.registered_node_types.NestedAttentionApply)", 120)
        time.sleep(2)  # the first-run template browser opens after the graph
        browser.evaluate("document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach(b => b.click())")
        for key, value in SETTINGS.items():
            browser.evaluate("app.extensionManager.setting.set(%s, %s)" % (json.dumps(key), json.dumps(value)))
        browser.evaluate("app.loadGraphData(%s, true, true, %s)" % (json.dumps(graph), json.dumps(a.workflow)))
        browser.wait_for("app.graph._nodes.length == %d" % len(graph["nodes"]))
        browser.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        browser.wait_for("[...document.querySelectorAll('img')].every(i => i.complete)")
        time.sleep(2)  # widgets and the image preview settle
        if browser.evaluate("document.querySelectorAll('.p-dialog').length"):
            raise SystemExit(
                "a dialog is open over the graph (missing nodes?): "
                + str(
                    browser.evaluate("[...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 200))")
                )
            )
        browser.screenshot(a.out)
    print(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
