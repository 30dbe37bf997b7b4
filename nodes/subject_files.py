import os

import folder_paths

from ..na_engine import NestedAttentionError, SubjectSet, load_subject, save_subject
from .paths import SUBJECT_FOLDER, load_named_adapter, subject_dir

NAME_MAX = 255  # bytes in one file name (ext4, NTFS, APFS)


class NestedSubjectSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subjects": ("NESTED_SUBJECTS", {"tooltip": "Encoded subjects to keep for later graphs."}),
                "name": (
                    "STRING",
                    {
                        "default": "my_subject",
                        "tooltip": "File name in models/nested_subjects; existing files are never overwritten.",
                    },
                ),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "nested_attention"
    DESCRIPTION = "Saves encoded subjects as .safetensors, one file per subject, so photos are encoded once."

    def save(self, subjects, name):
        base = os.path.basename(name.strip()) or "subject"
        stems = [base if len(subjects) == 1 else f"{base}_{subject.trigger}" for subject in subjects]
        longest = max(len(f"{stem}_999.safetensors".encode()) for stem in stems)  # with a number, if taken
        if longest > NAME_MAX or "\0" in base:
            raise NestedAttentionError(
                f"The subject name ({len(base)} characters) would make a file name of {longest} bytes with its "
                f"ending; a file name may have at most {NAME_MAX}. Give a shorter name, without NUL characters."
            )
        saved = []
        for subject, stem in zip(subjects, stems):
            path = _free_path(os.path.join(subject_dir(), stem))
            save_subject(subject, path, subject.source.get("adapter", ""))
            saved.append(os.path.basename(path))
        return {"ui": {"text": saved}}


class NestedSubjectLoad:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject_file": (
                    folder_paths.get_filename_list(SUBJECT_FOLDER),
                    {"tooltip": "A subject saved by Save Nested Subject, in models/nested_subjects."},
                )
            }
        }

    RETURN_TYPES = ("NESTED_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    FUNCTION = "load"
    CATEGORY = "nested_attention"
    DESCRIPTION = "Loads a saved subject together with the adapter it was encoded with."

    def load(self, subject_file):
        path = folder_paths.get_full_path(SUBJECT_FOLDER, subject_file)
        if path is None:
            raise NestedAttentionError(
                f"Subject file {subject_file!r} is not in {', '.join(folder_paths.get_folder_paths(SUBJECT_FOLDER))}."
            )
        subject = load_subject(path, load_named_adapter)
        return (SubjectSet([subject.with_(source={**subject.source, "adapter": subject.adapter.name})]),)


def _free_path(stem: str) -> str:
    path, n = f"{stem}.safetensors", 1
    while os.path.exists(path):
        path, n = f"{stem}_{n}.safetensors", n + 1
    return path
