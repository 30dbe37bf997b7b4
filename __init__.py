"""ComfyUI Nested Attention: subject personalization by nested attention (Patashnik et al., 2025)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# help pages (web/docs/<NodeType>.md, web/docs/<NodeType>/<locale>.md), served under /extensions/<folder>/
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
