"""pytest fixtures around tests/support/comfy_harness.py (ComfyUI import + tiny random models).

Tests that need ComfyUI take the `comfy` fixture (or call require_comfy()); they are skipped
with a clear reason only when no ComfyUI tree is found at all. CI always has one
(.ci/run sources scripts/setup_env.sh, which provides the 2024 copy / COMFYUI_PATH).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SUPPORT = os.path.join(HERE, "support")  # the harness: ComfyUI import, model fixtures, server, builders
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
if REPO not in sys.path:
    # at the end: ComfyUI's nodes.py must win over this pack's nodes/ package
    sys.path.append(REPO)

import comfy_harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a real ComfyUI server (slow; uses comfy-cli)")


def require_comfy():
    """Import ComfyUI or skip; a set-but-wrong COMFYUI_PATH, or no ComfyUI under CI, fails instead."""
    if comfy_harness.comfy_root() is None:
        env = os.environ.get("COMFYUI_PATH")
        if env:
            pytest.fail("COMFYUI_PATH=%s has no main.py" % env)
        if os.environ.get("CI"):
            pytest.fail("no ComfyUI found under CI: .ci/run must source scripts/setup_env.sh")
        pytest.skip("no ComfyUI found: set COMFYUI_PATH or run scripts/setup_env.sh")
    return comfy_harness.import_comfy()


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process (CPU); yields the harness module."""
    require_comfy()
    return comfy_harness


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    import nodes

    return nodes


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    return comfy.tiny_sd15_model()


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    return comfy.tiny_sdxl_like_model()


@pytest.fixture(scope="session")
def tiny_clip(comfy):
    return comfy.tiny_clip()


@pytest.fixture(scope="session")
def tiny_sdxl_clip(comfy):
    return comfy.tiny_sdxl_clip()


@pytest.fixture(scope="session")
def tiny_vae(comfy):
    return comfy.tiny_vae()


@pytest.fixture(scope="session")
def tiny_clip_vision(comfy):
    return comfy.tiny_clip_vision()


# -- the pack as ComfyUI imports it, and its model folders ------------------------------------


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy.import_pack()


@pytest.fixture(scope="module")
def engine(pack):
    return pack.na_engine


@pytest.fixture
def model_dirs(pack, tmp_path):
    """Put temp folders first in the pack's model folders, as extra_model_paths.yaml would."""
    import folder_paths

    saved = {}
    for name in ("nested_attention", "nested_subjects"):
        dirs, exts = folder_paths.folder_names_and_paths[name]
        saved[name] = (list(dirs), exts)
        (tmp_path / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(tmp_path / name)] + list(dirs), exts)
    yield tmp_path
    folder_paths.folder_names_and_paths.update(saved)
