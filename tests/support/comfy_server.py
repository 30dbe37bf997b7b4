"""Run a real ComfyUI server (either supported version) with this pack installed, for tests.

    with ComfyServer(models_dir) as srv:      # models_dir/{checkpoints,clip_vision,...}
        srv.object_info()                      # GET /object_info
        srv.run_workflow("tests/workflows_core_smoke.json")   # via comfy-cli, UI or API format

The pack is installed by a symlink in a temp custom_nodes dir that the `custom_nodes:` key of a
temp extra_model_paths yaml adds (works on 2024 and current ComfyUI: both load
--extra-model-paths-config before custom nodes). Output/temp/input (and, where supported,
user dir and database) go to the temp dir, so the ComfyUI tree is not written to.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import comfy_harness  # noqa: E402

PACK_NAME = comfy_harness.PACK_NAME
MODEL_FOLDERS = (
    "checkpoints",
    "clip_vision",
    "vae",
    "loras",
    "embeddings",
    "nested_attention",
    "ipadapter",
    "diffusion_models",  # current ComfyUI's names for Flux's files (workflow 06)
    "text_encoders",
)


def test_sized(workflow_path, out_dir, scale=8, steps=3):
    """A copy of a UI-format workflow that runs quickly on CPU: every EmptyLatentImage 1/scale of
    its size, every KSampler `steps` steps. Returns the copy's path."""
    with open(workflow_path) as f:
        wf = json.load(f)
    for node in wf["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "EmptyLatentImage":
            values[0], values[1] = values[0] // scale, values[1] // scale
        elif node["type"] == "KSampler":
            values[2] = steps
    out = os.path.join(out_dir, os.path.basename(workflow_path))
    with open(out, "w") as f:
        json.dump(wf, f)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _supports(root, flag):
    with open(os.path.join(root, "comfy", "cli_args.py")) as f:
        return '"%s"' % flag in f.read()


def _venv_of(python):
    """comfy-cli picks ComfyUI's python from $VIRTUAL_ENV: the dir above bin/ of our interpreter."""
    return os.path.dirname(os.path.dirname(os.path.abspath(python)))


class ComfyServer:
    def __init__(
        self,
        models_dir,
        comfy_dir=None,
        python=None,
        port=None,
        install_pack=True,
        extra_args=(),
        startup_timeout=180,
        pack_dir=REPO,
        pack_name=PACK_NAME,
    ):
        self.root = os.path.abspath(comfy_dir or comfy_harness.comfy_root() or "")
        if not os.path.isfile(os.path.join(self.root, "main.py")):
            raise RuntimeError("no ComfyUI tree at %r" % self.root)
        self.models_dir = os.path.abspath(models_dir)
        self.python = python or sys.executable
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.install_pack = install_pack
        self.pack_dir = os.path.abspath(pack_dir)
        self.pack_name = pack_name  # the folder name in custom_nodes (the frontend shows it as the pack's name)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.proc = None
        self.tmp = None
        self.log_path = None

    # ------------------------------------------------------------------ lifecycle
    def _write_config(self):
        nodes_dir = os.path.join(self.tmp, "custom_nodes")
        os.makedirs(nodes_dir, exist_ok=True)
        if self.install_pack and not os.path.lexists(os.path.join(nodes_dir, self.pack_name)):
            os.symlink(self.pack_dir, os.path.join(nodes_dir, self.pack_name))
        cfg = {"na_test": {"base_path": self.models_dir, "custom_nodes": nodes_dir}}
        for name in MODEL_FOLDERS:
            os.makedirs(os.path.join(self.models_dir, name), exist_ok=True)
            cfg["na_test"][name] = name
        path = os.path.join(self.tmp, "extra_model_paths.yaml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is valid YAML
        return path

    def command(self):
        a = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--extra-model-paths-config",
            self._write_config(),
        ]
        for d in ("output", "temp", "input"):
            os.makedirs(os.path.join(self.tmp, d), exist_ok=True)
            a += ["--%s-directory" % d, os.path.join(self.tmp, d)]
        if _supports(self.root, "--user-directory"):
            os.makedirs(os.path.join(self.tmp, "user"), exist_ok=True)
            a += ["--user-directory", os.path.join(self.tmp, "user")]
        if _supports(self.root, "--database-url"):
            a += ["--database-url", "sqlite:///" + os.path.join(self.tmp, "comfyui.db")]
        if _supports(self.root, "--disable-api-nodes"):
            a += ["--disable-api-nodes"]
        return a + self.extra_args

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix="na-comfy-server-")
        self.log_path = os.path.join(self.tmp, "server.log")
        cmd = self.cmd = self.command()
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
            try:
                self.get("/system_stats", timeout=2)
                return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError("ComfyUI did not answer in %ss:\n%s" % (self.startup_timeout, self.log_tail()))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # own session: main.py and nothing else
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def cleanup(self):
        self.stop()
        if self.tmp and not os.environ.get("NA_KEEP_SERVER_TMP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def log_tail(self, n=60):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ HTTP
    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def object_info(self, node_class=None):
        return self.get("/object_info" + ("/" + node_class if node_class else ""))

    # ------------------------------------------------------------------ comfy-cli
    def comfy_cli(self, *args, timeout=600):
        """Run comfy-cli (same venv as self.python) against this server's ComfyUI tree."""
        exe = os.path.join(os.path.dirname(self.python), "comfy")
        env = dict(os.environ, VIRTUAL_ENV=_venv_of(self.python), COMFY_CLI_NO_REMOTE_REFRESH="1")
        subprocess.run(
            [exe, "--skip-prompt", "tracking", "disable"],
            env=env,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        return subprocess.run(
            [exe, "--skip-prompt", "--workspace", self.root] + list(args),
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def run_workflow(self, workflow_path, timeout=600):
        """`comfy run --workflow FILE --wait`; returns {"status", "outputs": [local image paths],
        "urls": [/view URLs], "prompt_id", "returncode", "raw"}. status is comfy-cli's
        ("completed" on success)."""
        r = self.comfy_cli(
            "run",
            "--workflow",
            os.path.abspath(workflow_path),
            "--wait",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--timeout",
            str(timeout),
            timeout=timeout + 60,
        )
        doc = _last_json(r.stdout)
        result = {
            "returncode": r.returncode,
            "raw": r.stdout + r.stderr,
            "status": None,
            "prompt_id": None,
            "outputs": [],
            "urls": [],
        }
        if doc is not None:
            data = (doc.get("data") or doc) if isinstance(doc, dict) else {}  # failures: data is null
            result["status"] = data.get("status") or doc.get("status")
            result["prompt_id"] = data.get("prompt_id")
            result["urls"] = sorted(u for u in data.get("outputs", []) if isinstance(u, str))
            result["outputs"] = [self.local_path(u) for u in result["urls"]]
        return result

    def local_path(self, view_url_or_path):
        """comfy-cli reports outputs as /view?filename=..&subfolder=..&type=output URLs (it cannot know
        our --output-directory); map them to files in this server's temp dirs."""
        u = urllib.parse.urlparse(view_url_or_path)
        if not u.scheme:
            return view_url_or_path
        q = urllib.parse.parse_qs(u.query)
        kind = q.get("type", ["output"])[0]
        return self.file_path(kind, q.get("subfolder", [""])[0], q["filename"][0])

    def file_path(self, kind, subfolder, filename):
        """Local path of an output/temp/input file; ComfyUI puts temp files in <--temp-directory>/temp."""
        path = os.path.join(self.tmp, kind, subfolder, filename)
        nested = os.path.join(self.tmp, kind, kind, subfolder, filename)
        return nested if kind == "temp" and not os.path.exists(path) and os.path.exists(nested) else path


def _last_json(text):
    """comfy-cli prints JSON envelopes when stdout is not a TTY; take the last parseable one."""
    dec = json.JSONDecoder()
    found, i = None, 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = dec.raw_decode(text, i)
            found, i = obj, end
        except ValueError:
            i += 1
