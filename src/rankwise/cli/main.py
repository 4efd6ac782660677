"""Entry point of the ``rankwise`` command.

Each sub-command lives in ``rankwise.cli.<name>`` and exposes ``add_parser(subparsers)``, which adds its parser and
sets ``func=run`` with ``run(args) -> int``. A ``RankwiseError`` becomes one clear line on stderr and exit code 2
(3 for a ``NonFiniteError``: training hit NaN/inf); Ctrl-C exits with 130. ``train`` and ``bench`` also take
``--config FILE`` (``rankwise.cli.config_file``): flags from a TOML/YAML file, which flags on the command line
override.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import RankwiseError
from . import config_file

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
    "generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="Low-rank training of transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rankwise.cli.{name}").add_parser(sub)
    for name in config_file.COMMANDS:
        sub.choices[name].add_argument("--config", metavar="FILE",
                                       help="read flags from a TOML or YAML file; flags given here override it")
    return parser


def _negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse takes ``-1e-3`` for an option, so the value's own validation
    (``lr must be > 0``) would never speak."""
    fixed: list[str] = []
    for tok in argv:
        prev = fixed[-1] if fixed else ""
        if tok.startswith("-") and prev.startswith("--") and "=" not in prev:
            try:
                float(tok)
                fixed[-1] = f"{prev}={tok}"
                continue
            except ValueError:
                pass
        fixed.append(tok)
    return fixed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE``, the file's values become the sub-command's defaults first."""
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        config_file.apply(sub.choices[args.command], config_file.read(args.config), args.config)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except RankwiseError as e:
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        print(f"rankwise {command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except RankwiseError as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"rankwise {args.command}: error: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"rankwise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
