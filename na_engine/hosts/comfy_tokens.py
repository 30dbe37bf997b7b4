"""Where a prompt's trigger sits in the context a ComfyUI text encoder hands the model.

``clip.tokenize(text)`` gives, per tokenizer of the CLIP object, a list of chunks of (id, weight[, word_id]); the
encoder turns each tokenizer's chunks into states and the model's context concatenates some of them along the
sequence.  A family names those parts in order: (tokenizer key, its end id), key None for the first tokenizer
(SD1's "l"; SDXL's "g" and "l" lie at the same positions, so either one's chunks count).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..errors import NestedAttentionError
from ..tokens import find_in_parts, word_ids


def context_positions(
    clip, tokens: dict, parts: Sequence[Tuple[Optional[str], int]], trigger: str, text: str, missing: str
) -> List[int]:
    """The context positions of the trigger in ``tokens`` (``clip.tokenize(text)``).  ``missing``: what to do when
    the CLIP object has none of a part's tokenizer (e.g. "Load Flux's text encoders with DualCLIPLoader")."""
    word = clip.tokenize(trigger)
    found = [(chunks(tokens, key, missing), word_ids(chunks(word, key, missing)[0], end)) for key, end in parts]
    return find_in_parts(found, trigger, text)


def chunks(tokens: dict, key: Optional[str], missing: str) -> list:
    if key is None:
        return next(iter(tokens.values()))
    if key not in tokens:
        raise NestedAttentionError(
            f"The CLIP input has no {key} text encoder (it gives {sorted(tokens)}), which this model's text is made "
            f"of. {missing}"
        )
    return tokens[key]
