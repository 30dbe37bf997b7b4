import torch

import nodes as comfy_nodes

from ..na_engine import NestedAttentionError


class NestedAttentionMapPreview(comfy_nodes.PreviewImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "capture": ("NESTED_CAPTURE", {"tooltip": "From the capture output of Nested Attention Patch."}),
                "image": ("IMAGE", {"tooltip": "The decoded image(s) sampled with that patch."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("maps",)
    OUTPUT_TOOLTIPS = (
        "Per subject and image: where the trigger attends | which subject token each pixel draws from | the "
        "reference coloured by token.",
    )
    FUNCTION = "preview"
    OUTPUT_NODE = True
    CATEGORY = "nested_attention"
    DESCRIPTION = (
        "Shows the paper's two views: the trigger's attention map and the colour-coded nested token map, "
        "summed over steps and layers."
    )

    def preview(self, capture, image):
        if capture is None:
            raise NestedAttentionError(
                "The Nested Attention Patch recorded no maps: it last ran while no preview was connected "
                "(recording is off then, so it costs nothing), and ComfyUI reused that cached run. Change any "
                "setting of the Patch (e.g. strength 1.0 -> 1.01) or free the node cache from ComfyUI's menu, "
                "then queue again."
            )
        maps = capture.render(image.detach().cpu().float())
        ui = self.save_images(maps, filename_prefix="nested_attention_maps")
        return {"ui": ui["ui"], "result": (maps.to(torch.float32),)}
