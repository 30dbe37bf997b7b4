"""A headless Chromium driven over the DevTools protocol, for the tests that open ComfyUI's real frontend.

    with HeadlessChromium() as browser:             # raises BrowserMissing when no Chromium is installed
        browser.open("http://127.0.0.1:8188")
        browser.wait_for("!!window.app && !!app.graph")
        browser.evaluate("app.graph._nodes.length")

The browser is found as $NA_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH. The protocol
is spoken through aiohttp's websocket client (ComfyUI's own dependency), so no browser-driver package is needed.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserMissing(RuntimeError):
    pass


class EvaluationError(RuntimeError):
    pass


def find_chromium():
    path = os.environ.get("NA_CHROMIUM") or next((p for p in map(shutil.which, NAMES) if p), None)
    if not path:
        raise BrowserMissing("no Chromium found: install one (e.g. apt-get install chromium) or set NA_CHROMIUM")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadlessChromium:
    def __init__(self, executable=None, size=(1600, 1000), startup_timeout=60):
        self.executable = executable or find_chromium()
        self.size = size
        self.startup_timeout = startup_timeout
        self.proc = self.tmp = self.ws = self.session = None
        self.loop = asyncio.new_event_loop()
        self._id = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        self.tmp = tempfile.mkdtemp(prefix="na-chromium-")
        port = _free_port()
        cmd = [
            self.executable,
            "--headless=new",
            "--no-sandbox",  # tests may run as root
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=%d" % port,
            "--user-data-dir=" + os.path.join(self.tmp, "profile"),
            "--window-size=%d,%d" % self.size,
            "about:blank",
        ]
        log = open(os.path.join(self.tmp, "chromium.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("Chromium did not start: see %s" % log.name)
            time.sleep(0.2)
        self.loop.run_until_complete(self._connect(pages[0]["webSocketDebuggerUrl"]))
        self.call("Runtime.enable")
        self.call("Page.enable")
        return self

    async def _connect(self, url):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    def stop(self):
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())
            self.session = self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # own session: the browser and its helpers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.loop.close()

    # ------------------------------------------------------------------ protocol
    def call(self, method, timeout=60, **params):
        return self.loop.run_until_complete(asyncio.wait_for(self._call(method, params), timeout))

    async def _call(self, method, params):
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self._id:
                if "error" in message:
                    raise EvaluationError("%s: %s" % (method, message["error"]))
                return message.get("result", {})

    def evaluate(self, expression, timeout=60):
        """The value of a JavaScript expression (promises awaited), as JSON."""
        result = self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise EvaluationError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def open(self, url):
        self.call("Page.navigate", url=url)

    def wait_for(self, expression, timeout=60, every=0.25):
        """Poll until the expression is truthy; returns its value."""
        deadline = time.time() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except EvaluationError:
                value = None  # the page may still be loading
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError("still false after %ss: %s" % (timeout, expression))
            time.sleep(every)

    def screenshot(self, path):
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
