"""``rankwise methods``: the registered methods, their family, options and one-line description."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered methods", description=__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from ..methods import available

    infos = available()
    if args.json:
        print(json.dumps([{"name": m.name, "family": m.family, "description": m.description,
                           "options": m.options()} for m in infos], indent=1, default=str))
        return 0
    table = Table(title="rankwise methods")
    for col in ("method", "family", "description", "options (default)"):
        table.add_column(col)
    for m in infos:
        opts = ", ".join(f"{k}={v}" for k, v in m.options().items())
        table.add_row(m.name, m.family, m.description, opts)
    Console().print(table)
    return 0
