"""``rankwise methods``: the registered methods by family, each with its description and its options at their real
defaults (``--opt KEY=VALUE`` sets any of them), laid out to fit 80 columns."""

from __future__ import annotations

import argparse
import textwrap

WIDTH = 80
NAME_WIDTH = 14
# options that are other names of another option (``--r`` / ``--rank``)
ALIASES = {"rank": "r"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered methods", description=__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def format_options(defaults: dict) -> str:
    """``k=v, ...`` with an alias shown beside the option it names (``r=8 (or rank)``)."""
    parts = []
    for k, v in defaults.items():
        if ALIASES.get(k) in defaults and v is None:
            continue
        alias = [a for a, target in ALIASES.items() if target == k and a in defaults]
        parts.append(f"{k}={v}" + (f" (or {alias[0]})" if alias else ""))
    return ", ".join(parts)


def render(infos: list, width: int = WIDTH) -> str:
    indent = " " * (NAME_WIDTH + 2)
    lines = ["rankwise methods: rankwise train --method NAME [--opt KEY=VALUE ...]"]
    family = None
    for m in infos:
        if m.family != family:
            family = m.family
            lines += ["", family]
        lines += textwrap.wrap(m.description, width, initial_indent=f"  {m.name:<{NAME_WIDTH}}"
                               if len(m.name) <= NAME_WIDTH else f"  {m.name}\n{indent}",
                               subsequent_indent=indent, break_on_hyphens=False)
        opts = format_options(m.defaults())
        if opts:
            lines += textwrap.wrap(opts, width, initial_indent=indent, subsequent_indent=indent + "  ",
                                   break_on_hyphens=False, break_long_words=True)
    return "\n".join(line for chunk in lines for line in chunk.split("\n"))


def run(args: argparse.Namespace) -> int:
    import json

    from ..methods import available

    infos = available()
    if args.json:
        print(json.dumps([{"name": m.name, "family": m.family, "description": m.description,
                           "options": m.defaults()} for m in infos], indent=1, default=str))
        return 0
    print(render(infos))
    return 0
