import comfy.ldm.modules.attention as comfy_attention

from ..na_engine import AttentionCapture, NestedAttentionError, token_legend
from ..na_engine.families import comfy_family
from ..na_engine.hosts.comfy_layers import match_layers
from ..na_engine.hosts.comfy_patch import NestedRun


class NestedAttentionApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (SD1.5, SDXL or Flux family, LoRAs welcome)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint; the prompt is encoded here."}),
                "subjects": (
                    "NESTED_SUBJECTS",
                    {"tooltip": "From Nested Subject Encoder, Multi-Subject Combine or Load Nested Subject."},
                ),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "a photo of a person",
                        "tooltip": "The positive prompt. It must contain each subject's trigger word where that "
                        "subject should appear.",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 3.0,
                        "step": 0.05,
                        "tooltip": "How much of the subject the trigger word carries. 1.0 is the method as "
                        "published; lower follows the prompt more and looks less like the subject; above 1 "
                        "exaggerates the subject at the prompt's expense.",
                    },
                ),
                "start_at": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "When the subject starts to act, as a fraction of sampling (0 = first step). "
                        "Start later to let the prompt set the composition and pose first.",
                    },
                ),
                "end_at": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "When the subject stops acting (1 = last step). End earlier to leave the finest "
                        "details to the prompt and the model.",
                    },
                ),
            },
            "optional": {
                "trigger_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "How much attention the trigger word gets against the other words of the prompt. "
                        "Keep 1.0 with an adapter trained for Nested Attention. With an IP-Adapter Plus file, higher "
                        "values make a faint subject louder but pull the picture toward the reference photo (its "
                        "pose and details too); lower it if the prompt loses ground. The help page explains the "
                        "trade-off.",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING", "NESTED_CAPTURE")
    RETURN_NAMES = ("model", "positive", "capture")
    CAPTURE_OUTPUT = RETURN_NAMES.index("capture")  # graph links name an output by its index
    OUTPUT_TOOLTIPS = (
        "The model with nested attention on every cross-attention layer.",
        "The encoded prompt: use it as the sampler's positive input (ControlNet and Combine may follow).",
        "Attention maps for Attention Map Preview; recorded only when a preview is connected.",
    )
    FUNCTION = "apply"
    CATEGORY = "nested_attention"
    DESCRIPTION = "Binds subjects to their trigger words in the prompt and patches the model with Nested Attention."

    def apply(
        self,
        model,
        clip,
        subjects,
        text,
        strength=1.0,
        start_at=0.0,
        end_at=1.0,
        trigger_weight=1.0,
        prompt=None,
        unique_id=None,
    ):
        if not subjects:
            raise NestedAttentionError("No subjects given; connect a Nested Subject Encoder.")
        if start_at > end_at:
            raise NestedAttentionError(
                f"start_at ({start_at}) is after end_at ({end_at}); the subject would never be applied."
            )
        diffusion = model.model.diffusion_model
        family = comfy_family(diffusion)
        family.check_comfy(diffusion, hasattr(comfy_attention, "wrap_attn"))  # where the attention override is honoured
        tokens = clip.tokenize(text)
        positions = [family.comfy_positions(clip, tokens, s.trigger, text) for s in subjects]
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)

        model_layers = family.comfy_layers(diffusion)
        for s in subjects:
            match_layers(s.adapter.layers, model_layers, repr(getattr(s.adapter, "name", "The adapter")))
        sampling = (
            model.get_model_object("model_sampling")
            if hasattr(model, "get_model_object")
            else model.model.model_sampling
        )
        sigmas = (float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at)))
        capture = (
            AttentionCapture([_legend(s) for s in subjects])
            if _consumed(prompt, unique_id, self.CAPTURE_OUTPUT)
            else None
        )
        run = NestedRun(
            subjects,
            positions,
            cond.cpu(),
            strength,
            sigmas,
            comfy_attention.optimized_attention,
            capture,
            trigger_weight,
            text,
        )

        patched = model.clone()
        family.register(patched, run, [k for k, _ in model_layers])
        return (patched, [[cond, {"pooled_output": pooled}]], capture)


def _legend(subject):
    if subject.token_attention is None or subject.reference is None:
        return None
    return token_legend(subject.token_attention, subject.reference)


def _consumed(prompt, unique_id, output: int) -> bool:
    """Whether any node of the queued graph takes this node's output ``output``."""
    if not prompt or unique_id is None:
        return False
    link = [str(unique_id), output]
    return any(
        isinstance(value, list) and len(value) == 2 and [str(value[0]), value[1]] == link
        for node in prompt.values()
        for value in node.get("inputs", {}).values()
    )
