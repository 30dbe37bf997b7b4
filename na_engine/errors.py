"""The one exception type users see: a sentence saying what was wrong and what to do."""

import errno
import functools
import sys


class NestedAttentionError(ValueError):
    """Bad input to Nested Attention, with a message meant for the person who made it."""


def describe(e: BaseException) -> str:
    """An unexpected error as one sentence: what failed, on which file, without a traceback."""
    if isinstance(e, OSError) and e.filename:
        return (
            f"{e.strerror or type(e).__name__}: {e.filename}. Check that the path exists and that you may write there."
        )
    if isinstance(e, MemoryError):
        return "out of memory. Use smaller images, a smaller batch or fewer rows at once."
    return f"{type(e).__name__}: {e}"


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk is full: an OSError's ENOSPC, or a library's message carrying it (safetensors)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
        s in str(e) for s in ("No space left on device", "StorageFull")
    )


def command_line(main=None, *, interrupted: str = "run the same command again to continue."):
    """Wrap a ``main(argv) -> int`` so that no failure prints a raw traceback:

    - a NestedAttentionError prints 'error: ...' and exits 2;
    - a full disk prints that (what was finished is kept), then ``interrupted``, and exits 1;
    - Ctrl-C prints that it was interrupted (finished work is kept), then ``interrupted``, and exits 130;
    - any other error prints one line naming it and exits 1; ``--debug`` anywhere in argv re-raises it
      with its traceback instead."""

    if main is None:  # used as @command_line(interrupted=...)
        return functools.partial(command_line, interrupted=interrupted)

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv)
        except NestedAttentionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"interrupted: what was finished is kept; {interrupted}", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            if disk_full(e):
                where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
                print(
                    f"error: no space left on the device{where}; what was finished is kept. Free some space, then "
                    f"{interrupted}",
                    file=sys.stderr,
                )
                return 1
            print(
                f"error: {describe(e)}\n(an unexpected failure: rerun with --debug for the traceback)", file=sys.stderr
            )
            return 1

    return wrapped
