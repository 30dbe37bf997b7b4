"""Finding the trigger word in a tokenized prompt.

ComfyUI tokenizes a prompt into chunks of 77 (id, weight[, word_id]) tuples,
each chunk starting with BOS; the text encoder concatenates the chunks, so a
token at position p of chunk c sits at c*77 + p in the context.  The trigger
is found as its BPE id sequence, wherever it occurs and whatever its weight.
Flux's T5 gives one chunk with no BOS, ended by </s> (id 1) and padded with 0.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple

from .errors import NestedAttentionError

BOS, EOS = 49406, 49407  # CLIP's
T5_END = 1  # T5's </s>; its padding (0) comes after it


def has_word(caption: str, word: str) -> bool:
    """Whether ``word`` stands in ``caption`` as a whole word, in any case."""
    return re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", caption.lower()) is not None


def word_ids(tokenized_chunk: Sequence, end: int = EOS) -> List[int]:
    """The ids of one tokenized word, as a tokenizer returns it in a single chunk: [BOS] ids end pad...

    ``end`` is the tokenizer's end id: CLIP's EOS, or T5_END for T5."""
    ids = [_id(t) for t in tokenized_chunk]
    body = ids[1:] if ids and ids[0] == BOS else ids
    return body[: body.index(end)] if end in body else body


def find_trigger(chunks: Sequence[Sequence], trigger_ids: Sequence[int], trigger: str, prompt: str) -> List[int]:
    """Every context position of every occurrence of the trigger's ids (all its BPE tokens)."""
    return find_in_parts([(chunks, trigger_ids)], trigger, prompt)


def find_in_parts(parts: Sequence[Tuple[Sequence[Sequence], Sequence[int]]], trigger: str, prompt: str) -> List[int]:
    """``find_trigger`` over a context that concatenates several tokenizers' chunks (SD3's CLIP, then its T5):
    each part is (its chunks, the trigger's ids in its tokenizer), the positions counted across all parts."""
    if any(not ids for _, ids in parts):
        raise NestedAttentionError(
            f"The trigger word {trigger!r} has no tokens; give a word such as 'person', 'dog' or 'bottle'."
        )
    positions: List[int] = []
    offset = 0
    for chunks, trigger_ids in parts:
        n = len(trigger_ids)
        for chunk in chunks:
            ids = [_id(t) for t in chunk]
            for p in range(len(ids) - n + 1):
                if ids[p : p + n] == list(trigger_ids):
                    positions.extend(range(offset + p, offset + p + n))
            offset += len(ids)
    if not positions:
        words = " ".join(re.findall(r"[\w']+", prompt.lower()))
        raise NestedAttentionError(
            f'The trigger word {trigger!r} is not in the prompt. The prompt\'s words are: "{words}". '
            f'Write {trigger!r} in the prompt where the subject should appear, e.g. "a photo of a {trigger} on a '
            'beach".'
        )
    return positions


def _id(token) -> int:
    """A token's id; prompt embeddings (tensors in the id slot) never match a trigger."""
    t = token[0] if isinstance(token, (tuple, list)) else token
    return t if isinstance(t, int) else -1
