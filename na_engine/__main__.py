"""python -m na_engine inspect FILE"""
import argparse
import sys

from .errors import command_line
from .formats import inspect


@command_line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m na_engine", description="Nested Attention engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise an adapter file: family, base model, layers, tokens, keys")
    p.add_argument("file")
    args = parser.parse_args(argv)
    print(inspect(args.file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
