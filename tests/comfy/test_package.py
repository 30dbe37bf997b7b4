"""The registry metadata (pyproject.toml) as comfy-cli reads it, and the package `comfy node pack`
builds with .comfyignore: small, without tests or study weights, and still a working pack."""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RAW = "https://raw.githubusercontent.com/"
MAX_PACKAGE = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def pyproject():
    import tomlkit  # comfy-cli's TOML reader (tomllib needs Python 3.11)

    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        return tomlkit.load(f).unwrap()


@pytest.fixture(scope="module")
def parsed():
    """The configuration as comfy-cli's registry parser reads it (what `comfy node publish` sends)."""
    from comfy_cli.registry.config_parser import extract_node_configuration

    return extract_node_configuration(os.path.join(REPO, "pyproject.toml"))


def test_name_follows_the_registry_rules(pyproject):
    name = pyproject["project"]["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyproject["project"]["version"])


def test_comfy_cli_reads_every_field(parsed, pyproject):
    project, comfy = parsed.project, parsed.tool_comfy
    assert comfy.publisher_id and comfy.display_name
    assert project.description and project.license.file == "LICENSE"
    assert project.supported_os == ["OS Independent"]
    assert project.supported_comfyui_version == pyproject["tool"]["comfy"]["requires-comfyui"] != ""
    urls = pyproject["project"]["urls"]
    for key in ("Repository", "Documentation", "Bug Tracker"):
        assert urls[key].startswith("https://github.com/"), key
    assert project.urls.repository == urls["Repository"] and project.urls.issues == urls["Bug Tracker"]


@pytest.mark.parametrize("field, ratio, limit", [("Icon", 1.0, (400, 400)), ("Banner", 21 / 9, None)])
def test_icon_and_banner_are_committed_pictures_of_the_right_shape(pyproject, field, ratio, limit):
    url = pyproject["tool"]["comfy"][field]
    repository = pyproject["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    assert url.startswith(RAW + repository + "/main/"), url
    path = os.path.join(REPO, url.removeprefix(RAW + repository + "/main/"))
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert abs(w / h - ratio) < 0.01, (field, img.size)
    if limit:
        assert w <= limit[0] and h <= limit[1], (field, img.size)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """`comfy node pack`'s archive of the committed tree (git-tracked files minus .comfyignore)."""
    from comfy_cli.file_utils import zip_files

    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout: comfy node pack would archive every file")
    out = tmp_path_factory.mktemp("pack") / "node.zip"
    cwd = os.getcwd()
    os.chdir(REPO)  # zip_files reads .comfyignore and git ls-files from the working directory
    try:
        zip_files(str(out))
    finally:
        os.chdir(cwd)
    return out


def test_package_is_small_and_leaves_out_development_files(package):
    with zipfile.ZipFile(package) as z:
        names = z.namelist()
        unpacked = sum(i.file_size for i in z.infolist())
    assert os.path.getsize(package) < MAX_PACKAGE and unpacked < MAX_PACKAGE, (os.path.getsize(package), unpacked)
    for left_out in ("tests/", "study/weights/", "docs/study/", "docs/images/"):
        assert not [n for n in names if n.startswith(left_out)], left_out
    for kept in ("__init__.py", "pyproject.toml", "LICENSE", "nodes/apply.py", "web/docs/NestedAttentionApply.md"):
        assert kept in names, kept
    assert [n for n in names if n.startswith("example_workflows/") and n.endswith(".jpg")]


def test_package_imports_as_a_pack(package, tmp_path, comfy):
    """Unpacked into a custom_nodes folder and imported as ComfyUI imports a pack: same nodes, its docs there."""
    pack_dir = tmp_path / "custom_nodes" / "nested-attention"
    with zipfile.ZipFile(package) as z:
        z.extractall(pack_dir)
    name = "na_packaged_pack"
    spec = importlib.util.spec_from_file_location(
        name, pack_dir / "__init__.py", submodule_search_locations=[str(pack_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    assert set(module.NODE_CLASS_MAPPINGS) == set(comfy.import_pack().NODE_CLASS_MAPPINGS)
    docs = pack_dir / module.WEB_DIRECTORY / "docs"
    assert sorted(p.stem for p in docs.glob("*.md")) == sorted(module.NODE_CLASS_MAPPINGS)
