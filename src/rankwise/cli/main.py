"""Entry point of the ``rankwise`` command.

Each sub-command lives in ``rankwise.cli.<name>`` and exposes ``add_parser(subparsers)``, which adds its parser and
sets ``func=run`` with ``run(args) -> int``. A ``RankwiseError`` becomes one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import RankwiseError

COMMANDS = [
    "train",
    "eval",
    "methods",
    "bench",
    "merge",
    "plan",
    "analyze",
    "compress",
    "export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="Low-rank training of transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rankwise.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RankwiseError as e:
        print(f"rankwise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rankwise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
