from ..na_engine import Subject, SubjectSet
from ..na_engine.adapter import COMBINE_MODES
from ..na_engine.hosts.comfy_images import CROP_MODES, prepare_references, thumbnail


class NestedSubjectEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter": ("NESTED_ADAPTER", {"tooltip": "From Load Nested Attention Adapter."}),
                "clip_vision": (
                    "CLIP_VISION",
                    {"tooltip": "The CLIP vision model the adapter was made for (ViT-H/14 for most adapters)."},
                ),
                "image": (
                    "IMAGE",
                    {"tooltip": "One or more photos of ONE subject, as an image batch. Several photos help identity."},
                ),
                "trigger_word": (
                    "STRING",
                    {
                        "default": "person",
                        "tooltip": "An ordinary word of your prompt that stands for this subject: person, dog, "
                        "bottle...",
                    },
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Optional subject mask for the photos (any size); the background is greyed out "
                        "before encoding."
                    },
                ),
                "crop": (
                    list(CROP_MODES),
                    {
                        "default": "center",
                        "tooltip": "center: crop the middle square; pad: keep the whole photo on grey; squash: "
                        "stretch to a square.",
                    },
                ),
                "combine": (
                    list(COMBINE_MODES),
                    {
                        "default": "concat",
                        "tooltip": "concat: keep every photo's tokens (each pixel picks the best); average: one set "
                        "of tokens.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("NESTED_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("A set holding this one subject; combine several with Multi-Subject Combine.",)
    FUNCTION = "encode"
    CATEGORY = "nested_attention"
    DESCRIPTION = "Encodes photos of a subject into tokens bound to a trigger word."

    def encode(self, adapter, clip_vision, image, trigger_word, mask=None, crop="center", combine="concat"):
        refs = prepare_references(image, mask, crop)
        features = clip_vision.encode_image(refs)["penultimate_hidden_states"]
        tokens, attention = adapter.encode(features, combine)
        source = {
            "adapter": getattr(adapter, "name", ""),
            "images": int(refs.shape[0]),
            "combine": combine,
            "crop": crop,
        }
        subject = Subject(
            tokens.cpu(),
            adapter,
            trigger_word.strip(),
            token_attention=attention.cpu(),
            reference=thumbnail(refs[0].cpu()),
            source=source,
        )
        return (SubjectSet([subject]),)
