"""python -m na_engine COMMAND ...: the engine's commands.

    inspect FILE   summarise an adapter file: family, base model, layers, tokens, keys
    prepare ...    a folder of subject photos -> a training set   (standalone/prepare.py)
    train ...      train a Nested Attention encoder               (standalone/train.py; under accelerate too)
    generate ...   standalone inference, one run or a catalogue   (standalone/generate.py)

Each command's options: python -m na_engine COMMAND --help.  The standalone commands
load diffusers only when they are run.
"""

import argparse
import importlib
import sys

from .errors import command_line
from .formats import inspect

STANDALONE = ("prepare", "train", "generate")


@command_line
def inspect_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m na_engine inspect", description="Summarise an adapter file.")
    p.add_argument("file")
    print(inspect(p.parse_args(argv).file))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in ("inspect", *STANDALONE):
        print(f"error: name a command: inspect, {', '.join(STANDALONE)}\n{__doc__}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "inspect":
        return inspect_main(rest)
    return importlib.import_module(f".standalone.{command}", __package__).main(rest)


if __name__ == "__main__":
    sys.exit(main())
