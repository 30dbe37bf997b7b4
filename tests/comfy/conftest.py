"""Fixtures of the in-process ComfyUI tests: the pack as ComfyUI imports it, and its model folders."""

import pytest


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
