"""The trainer's checkpoint files: every piece of training state in one safetensors file, never a pickle.

checkpoint-N/state.safetensors holds the adapter's weights, the EMA, the optimizer, the LR schedule and the
mixed-precision scaler. A state dict is a tree of dicts, lists and numbers around tensors: the tensors are stored as
safetensors tensors and the tree, each tensor replaced by its name, as JSON in the file's metadata. Reading it runs
no code from the file. A folder that holds a pickle (what accelerate's save_state wrote: optimizer.bin,
random_states_0.pkl, custom_checkpoint_0.pkl) is refused before anything in it is read.
"""

from __future__ import annotations

import json
import os
from typing import Dict

from torch import Tensor, is_tensor

from ..errors import NestedAttentionError

STATE_FILE = "state.safetensors"
TREE_KEY = "na_engine.train_state"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib")


def _encode(value, tensors: Dict[str, Tensor]):
    """A JSON tree for ``value``; its tensors go into ``tensors`` under the names the tree gives them."""
    if is_tensor(value):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):  # keys kept with their type: an optimizer's state is keyed by int
        return {"dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state holds a {type(value).__name__}, which a checkpoint cannot store")


def _decode(tree, tensors: Dict[str, Tensor]):
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "dict" in tree:
        return {k: _decode(v, tensors) for k, v in tree["dict"]}
    return [_decode(v, tensors) for v in tree["list"]]


def save(path: str, state: dict) -> None:
    """``state`` (name -> a state dict) to one safetensors file."""
    from safetensors.torch import save_file

    tensors: Dict[str, Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, path, metadata={TREE_KEY: json.dumps(tree)})


def load(path: str) -> dict:
    """What ``save`` wrote; a damaged or foreign file is a NestedAttentionError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            tree = json.loads((f.metadata() or {})[TREE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(tree, tensors)
    except Exception as e:
        raise NestedAttentionError(
            f"{path} is not a training state this trainer wrote ({type(e).__name__}: {e}). Resume from another "
            "checkpoint, or start the run afresh."
        ) from None


def _is_pickle(path: str) -> bool:
    """By name, or by the first bytes: a pickle's protocol opcode, or torch.save's zip archive."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def refuse_pickles(folder: str) -> None:
    """A checkpoint folder holding a pickle is refused, naming the file: loading one can run any code."""
    found = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if _is_pickle(os.path.join(root, name))
    )
    if found:
        raise NestedAttentionError(
            f"{folder} holds {', '.join(found)}: pickle data, which can run any code when loaded, so this checkpoint "
            "is not read. The trainer keeps its state in state.safetensors only. A checkpoint written by the earlier "
            "trainer (accelerate's optimizer.bin, random_states_*.pkl, custom_checkpoint_*.pkl) cannot be resumed: "
            "start the run afresh under another --out, or with --init-from the adapter that run exported. If you "
            "got this folder from someone else, do not load it with other tools either."
        )
