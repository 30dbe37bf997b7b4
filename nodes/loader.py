from .paths import adapter_files, load_named_adapter


class NestedAttentionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter_name": (
                    adapter_files(),
                    {
                        "tooltip": "A Nested Attention adapter from models/nested_attention, or an IP-Adapter Plus / "
                        "Plus-Face checkpoint from models/ipadapter (training-free mode, experimental)."
                    },
                ),
            }
        }

    RETURN_TYPES = ("NESTED_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The subject encoder and per-layer nested projections.",)
    FUNCTION = "load"
    CATEGORY = "nested_attention"
    DESCRIPTION = "Loads a subject encoder for Nested Attention."

    def load(self, adapter_name):
        return (load_named_adapter(adapter_name),)
