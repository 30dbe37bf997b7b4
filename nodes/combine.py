from ..na_engine import SubjectSet
from ..na_engine.hosts.comfy_images import require_finite

SLOTS = 4


class NestedMultiSubjectCombine:
    @classmethod
    def INPUT_TYPES(cls):
        subjects = {"tooltip": "Subjects to place in the same image; every trigger word must differ."}
        mask = {"tooltip": "Optional region (any size) where these subjects may appear; resized to the image."}
        return {
            "required": {f"subjects_{i}": ("NESTED_SUBJECTS", subjects) for i in (1, 2)},
            "optional": {
                **{f"subjects_{i}": ("NESTED_SUBJECTS", subjects) for i in range(3, SLOTS + 1)},
                **{f"mask_{i}": ("MASK", mask) for i in range(1, SLOTS + 1)},
            },
        }

    RETURN_TYPES = ("NESTED_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    FUNCTION = "combine"
    CATEGORY = "nested_attention"
    DESCRIPTION = (
        "Puts several subjects, possibly from different adapters, into one set, each with an optional region mask."
    )

    def combine(self, **inputs):
        merged = []
        for i in range(1, SLOTS + 1):
            mask = inputs.get(f"mask_{i}")
            if mask is not None:
                require_finite(mask, f"mask_{i}")
            for subject in inputs.get(f"subjects_{i}") or ():
                merged.append(subject if mask is None else subject.with_(mask=mask.cpu()))
        return (SubjectSet(merged),)
