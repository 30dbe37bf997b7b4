"""python -m na_engine inspect FILE"""
import argparse
import sys

from .errors import NestedAttentionError
from .formats import inspect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m na_engine", description="Nested Attention engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise an adapter file: family, base model, layers, tokens, keys")
    p.add_argument("file")
    args = parser.parse_args(argv)
    try:
        print(inspect(args.file))
    except NestedAttentionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
