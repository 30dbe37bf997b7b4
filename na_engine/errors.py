"""The one exception type users see: a sentence saying what was wrong and what to do."""

import functools
import sys


class NestedAttentionError(ValueError):
    """Bad input to Nested Attention, with a message meant for the person who made it."""


def command_line(main):
    """Wrap a ``main(argv) -> int``: a NestedAttentionError prints 'error: ...' and exits 2."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except NestedAttentionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
