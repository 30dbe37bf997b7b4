"""Model folders: models/nested_attention and models/ipadapter for adapters, models/nested_subjects
for saved subjects.  Folders added through extra_model_paths.yaml are kept."""

import os

import folder_paths

from ..na_engine import NestedAttentionError, load_adapter

ADAPTER_FOLDERS = ("nested_attention", "ipadapter")
SUBJECT_FOLDER = "nested_subjects"
EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}


def register_folders() -> None:
    for name in ADAPTER_FOLDERS + (SUBJECT_FOLDER,):
        default = os.path.join(folder_paths.models_dir, name)
        dirs, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
        dirs = list(dirs) + ([default] if default not in dirs else [])
        folder_paths.folder_names_and_paths[name] = (dirs, set(exts) | EXTENSIONS)


def adapter_files() -> list:
    names = []
    for folder in ADAPTER_FOLDERS:
        names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return sorted(names)


def adapter_path(name: str) -> str:
    for folder in ADAPTER_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    searched = [d for f in ADAPTER_FOLDERS for d in folder_paths.get_folder_paths(f)]
    raise NestedAttentionError(f"Adapter {name!r} was not found. Put it in one of: {', '.join(searched)}.")


def load_named_adapter(name: str):
    adapter = load_adapter(adapter_path(name))
    adapter.name = name
    return adapter


def subject_dir() -> str:
    path = folder_paths.get_folder_paths(SUBJECT_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path
