"""Import this repository as a ComfyUI custom-node package, the way ComfyUI does (by path)."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "nested_attention_pack"


def load_pack():
    """The pack's top-level module; ComfyUI must be importable first (comfy_harness.import_comfy)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module
