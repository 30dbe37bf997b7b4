"""ComfyUI node classes; each module is one concern and only translates ComfyUI types to engine calls."""

from .apply import NestedAttentionApply
from .combine import NestedMultiSubjectCombine
from .encoder import NestedSubjectEncoder
from .loader import NestedAttentionLoader
from .paths import register_folders
from .preview import NestedAttentionMapPreview
from .subject_files import NestedSubjectLoad, NestedSubjectSave

register_folders()

NODE_CLASS_MAPPINGS = {
    "NestedAttentionLoader": NestedAttentionLoader,
    "NestedSubjectEncoder": NestedSubjectEncoder,
    "NestedMultiSubjectCombine": NestedMultiSubjectCombine,
    "NestedAttentionApply": NestedAttentionApply,
    "NestedAttentionMapPreview": NestedAttentionMapPreview,
    "NestedSubjectSave": NestedSubjectSave,
    "NestedSubjectLoad": NestedSubjectLoad,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NestedAttentionLoader": "Load Nested Attention Adapter",
    "NestedSubjectEncoder": "Nested Subject Encoder",
    "NestedMultiSubjectCombine": "Multi-Subject Combine",
    "NestedAttentionApply": "Nested Attention Patch",
    "NestedAttentionMapPreview": "Attention Map Preview",
    "NestedSubjectSave": "Save Nested Subject",
    "NestedSubjectLoad": "Load Nested Subject",
}
