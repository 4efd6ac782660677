"""The bench tables of the docs, generated from a bench's own ``results.md`` so that they cannot drift.

    rankwise bench --preset tiny --out runs/bench
    python -m rankwise.bench.docs runs/bench         # copy runs/bench/results.md to docs/bench_tiny_results.md and
                                                     # regenerate the tables in README.md and docs/bench.md
    python -m rankwise.bench.docs --check            # exit 1 if the docs differ from docs/bench_*_results.md
    python -m rankwise.bench.docs runs/frontier --name tiny-frontier   # another table set: docs/bench_<name>_results.md
                                                     # and the bench:<name>:... blocks

A generated block sits between marker comments, e.g. ``<!-- bench:tiny:table:begin -->`` and
``<!-- bench:tiny:table:end -->``: ``table`` is the results table (ranks, ppl ± sd, memory, tok/s, lr, reference
rows), ``claims`` the claims table; the text around the markers is left alone. ``tests/bench/test_bench_docs.py``
checks that the committed docs equal what this renders from the committed results file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import RankwiseError

RESULTS = Path("docs/bench_tiny_results.md")


def results_path(name: str) -> Path:
    """The committed results file behind the ``bench:<name>:...`` blocks."""
    return RESULTS if name == "tiny" else Path(f"docs/bench_{name}_results.md")
DOCS = (Path("README.md"), Path("docs/bench.md"))
_BLOCK = re.compile(r"(<!-- bench:(?P<preset>[\w-]+):(?P<name>\w+):begin -->\n)(.*?)(<!-- bench:(?P=preset):"
                    r"(?P=name):end -->)", re.S)


def _first_table(lines: list[str]) -> str:
    """The first markdown table (consecutive lines starting with ``|``) of ``lines``."""
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def tables(results_md: str) -> dict[str, str]:
    """``{"table": ..., "claims": ...}`` of a bench ``results.md`` (the claims: the first table after ``## Claims``)."""
    lines = results_md.splitlines()
    claims = next((i for i, line in enumerate(lines) if line.strip() == "## Claims"), None)
    found = {"table": _first_table(lines[:claims]), "claims": _first_table(lines[claims:]) if claims else ""}
    if not found["table"] or not found["claims"]:
        raise RankwiseError("the results file has no results table or no '## Claims' table; give the results.md "
                            "that `rankwise bench` wrote")
    return found


def render(doc: str, blocks: dict[str, str], preset: str = "tiny") -> str:
    """``doc`` with every ``bench:<preset>:<name>`` block replaced by ``blocks[name]``."""
    def fill(m: re.Match) -> str:
        if m.group("preset") != preset:
            return m.group(0)
        if m.group("name") not in blocks:
            raise RankwiseError(f"unknown generated block {m.group('name')!r}; known: {', '.join(blocks)}")
        return m.group(1) + blocks[m.group("name")] + m.group(5)

    return _BLOCK.sub(fill, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rankwise.bench.docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a bench --out folder or its results.md (default: the committed "
                                              "results file of --name, re-rendered)")
    p.add_argument("--name", default=None, help="which blocks (bench:<name>:...) and results file "
                                                "(docs/bench_<name>_results.md) to generate (default tiny; with "
                                                "--check and no results: every committed results file)")
    p.add_argument("--root", default=".", help="the repository (default: the current folder)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc differs")
    args = p.parse_args(argv)
    root = Path(args.root)
    if args.check and not args.results and args.name is None:
        names = sorted(f.name[len("bench_"):-len("_results.md")] for f in (root / "docs").glob("bench_*_results.md"))
    else:
        names = [args.name or "tiny"]
    stale: list[str] = []
    for name in names:
        committed = root / results_path(name)
        source = committed
        if args.results:
            source = Path(args.results)
            source = source / "results.md" if source.is_dir() else source
            if not source.is_file():
                print(f"error: no results file {source}", file=sys.stderr)
                return 2
        blocks = tables(source.read_text())
        for doc in DOCS:
            text = (root / doc).read_text()
            new = render(text, blocks, name)
            if new != text:
                stale.append(str(doc))
                if not args.check:
                    write_text_atomic(root / doc, new)
        if not args.check and source.resolve() != committed.resolve():
            shutil.copyfile(source, committed)
    stale = list(dict.fromkeys(stale))
    if args.check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m rankwise.bench.docs", file=sys.stderr)
        return 1 if stale else 0
    print(f"regenerated {', '.join(stale) or 'nothing (already up to date)'} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
