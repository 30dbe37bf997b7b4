"""The one exception type users see: a sentence saying what was wrong and what to do."""


class NestedAttentionError(ValueError):
    """Bad input to Nested Attention, with a message meant for the person who made it."""
