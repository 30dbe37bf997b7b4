"""The engine's tiers: the core imports neither hosts/ nor standalone/, hosts never import standalone/,
inference never imports training code, and nothing in na_engine imports ComfyUI."""

import ast
import os

import pytest

ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "na_engine")


def imported(path):
    """Absolute names of what a module of na_engine imports (relative imports resolved)."""
    package = ["na_engine"] + os.path.relpath(os.path.dirname(path), ENGINE).replace(".", "").split(os.sep)
    package = [p for p in package if p]
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.update([module] if node.module else [f"{module}.{a.name}" for a in node.names])
    return names


def modules(folder=""):
    root = os.path.join(ENGINE, folder)
    return [os.path.join(root, f) for f in sorted(os.listdir(root)) if f.endswith(".py")]


CORE = [m for m in modules() if os.path.basename(m) not in ("__init__.py", "__main__.py")]


@pytest.mark.parametrize("path", CORE, ids=os.path.basename)
def test_core_imports_no_host_and_no_standalone_code(path):
    bad = {n for n in imported(path) if n.startswith(("na_engine.hosts", "na_engine.standalone"))}
    assert not bad, f"{os.path.basename(path)} imports {bad}"


@pytest.mark.parametrize("path", modules("hosts"), ids=os.path.basename)
def test_hosts_import_no_standalone_code(path):
    assert not {n for n in imported(path) if n.startswith("na_engine.standalone")}


@pytest.mark.parametrize("name", ["models.py", "generate.py", "cli.py"])
def test_inference_imports_no_training_code(name):
    training = ("train", "train_data", "prepare")
    bad = {n for n in imported(os.path.join(ENGINE, "standalone", name)) if n.split(".")[-1] in training}
    assert not bad, f"{name} imports {bad}"


def test_nothing_in_the_engine_imports_comfy():
    paths = [os.path.join(d, f) for d, _, files in os.walk(ENGINE) for f in files if f.endswith(".py")]
    bad = {
        p: n for p in paths for n in imported(p) if n == "comfy" or n.startswith(("comfy.", "folder_paths", "nodes"))
    }
    assert not bad


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ENGINE", str(tmp_path))
    (tmp_path / "bad.py").write_text("from .hosts.comfy_patch import NestedRun\nfrom .standalone import train\n")
    assert {"na_engine.hosts.comfy_patch", "na_engine.standalone"} <= imported(str(tmp_path / "bad.py"))
