"""Where text comes from: corpora that exist offline on every machine, and loaders for what users bring.

A *source spec* is a string:

- ``stdlib-docs`` (default): the docstrings of the Python standard library (English prose, ~1.5 MB), gathered with
  ``inspect`` in a subprocess, so no module's import side effects reach the caller.
- ``stdlib-code``: the ``.py`` sources of the standard library (code, a second domain).
- a local ``.txt``/``.jsonl`` file or a folder of them (``.jsonl``: one JSON object per line, text in ``"text"``).
  A ``.txt`` file is split into documents at blank lines (paragraphs); a paragraph longer than ``MAX_DOC_CHARS``
  (4,096) characters is cut into chunks of at most that size, at the last line break (else space) before the limit.
  Files must be UTF-8 (a leading byte-order mark is allowed).
- ``hf:NAME[:CONFIG]`` (e.g. ``hf:allenai/c4:en``): a ``datasets`` dataset, streamed; needs ``pip install datasets``
  and internet access.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import RankwiseError

BUILTIN_SOURCES = {
    "stdlib-docs": "docstrings of the Python standard library (English prose)",
    "stdlib-code": "source code of the Python standard library (Python code)",
}

# Modules whose import has side effects (opens a browser, prints, starts a GUI) or that are test suites.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                 "pydoc_data", "__main__", "xxsubtype", "_xxtestfuzz"}

_GATHER_DOCS = r"""
import importlib, inspect, json, sys, warnings, io, contextlib
warnings.simplefilter("ignore")
skip = set(json.loads(sys.argv[1]))
seen, docs = set(), []
def add(doc):
    if doc and len(doc) > 40 and doc not in seen:
        seen.add(doc); docs.append(doc)
import pkgutil
def load(name):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:
        return None
names = []
for top in sorted(sys.stdlib_module_names):
    if top in skip or top.startswith("_"):
        continue
    mod = load(top)
    if mod is None:
        continue
    names.append(top)
    for info in sorted(pkgutil.walk_packages(getattr(mod, "__path__", []), top + ".", onerror=lambda _: None),
                       key=lambda i: i.name):
        if not any(part in skip or part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
for name in names:
    mod = load(name)
    if mod is None:
        continue
    add(inspect.getdoc(mod))
    for _, obj in sorted(vars(mod).items()):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isroutine(member) or isinstance(member, property):
                    add(inspect.getdoc(member))
json.dump(docs, sys.stdout)
"""


def stdlib_docs() -> list[str]:
    """Docstrings of the standard library's modules, classes, functions and methods, in a fixed order."""
    proc = subprocess.run([sys.executable, "-c", _GATHER_DOCS, json.dumps(sorted(_SKIP_MODULES))],
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RankwiseError(f"could not gather the standard library's docstrings: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def stdlib_code() -> list[str]:
    """The standard library's ``.py`` files (one document each), skipping tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in _SKIP_MODULES or rel[0] in ("site-packages", "dist-packages") or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    return docs


MAX_DOC_CHARS = 4096


def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """The documents of a plain-text file: its paragraphs (separated by blank lines), each cut into chunks of at
    most ``max_chars`` characters at the last line break, else the last space, else exactly at the limit."""
    if max_chars < 1:
        raise RankwiseError(f"max_chars must be a positive integer, got {max_chars}")
    docs = []
    for para in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text):
        para = para.strip("\r\n")
        while len(para) > max_chars:
            cut = para.rfind("\n", 1, max_chars + 1)
            if cut <= 0:
                cut = para.rfind(" ", 1, max_chars + 1)
            skip = 1 if cut > 0 else 0  # the line break or space at the cut is dropped, nothing else
            cut = cut if cut > 0 else max_chars
            docs.append(para[:cut])
            para = para[cut + skip:]
        docs.append(para)
    return [d for d in docs if d.strip()]


def read_utf8(path: Path) -> str:
    """The text of ``path``; a byte that is not UTF-8 is one clear error naming the file and its byte offset."""
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data[:offset].count(b"\n") + 1
        raise RankwiseError(f"{path}: byte offset {offset} (line {line}) is not UTF-8 (byte 0x{data[offset]:02x}: "
                            f"{e.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _read_file(path: Path) -> Iterator[str]:
    text = read_utf8(path)
    if path.suffix != ".jsonl":
        yield from split_text(text)
        return
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RankwiseError(f"{path}:{i}: not valid JSON ({e.msg}); .jsonl files need one JSON object "
                                "per line with the text in a \"text\" field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RankwiseError(f"{path}:{i}: expected an object with a string \"text\" field")
        yield record["text"]


def local_documents(path: str | os.PathLike) -> list[str]:
    """Documents from a ``.txt`` (paragraphs, see ``split_text``) or ``.jsonl`` file, or from every such file under a
    folder (sorted by path)."""
    p = Path(path)
    if not p.exists():
        raise RankwiseError(f"data path {str(p)!r} does not exist; pass a .txt/.jsonl file, a folder of them, "
                            f"or one of: {', '.join(BUILTIN_SOURCES)}, hf:NAME[:CONFIG]")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if p.is_dir() and not files:
        raise RankwiseError(f"data folder {str(p)!r} holds no .txt or .jsonl files")
    if p.is_file() and p.suffix not in (".txt", ".jsonl"):
        raise RankwiseError(f"data file {str(p)!r} is neither .txt nor .jsonl")
    try:
        return [doc for f in files for doc in _read_file(f) if doc.strip()]
    except OSError as e:
        raise RankwiseError(f"cannot read data path {str(p)!r}: {e.strerror}") from None


def hf_documents(spec: str, max_docs: int = 200_000, text_field: str = "text") -> list[str]:
    """Stream ``max_docs`` documents of ``hf:NAME[:CONFIG]`` from the hub with ``datasets`` (needs internet)."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise RankwiseError(f"data {spec!r} needs the `datasets` package: pip install 'rankwise[hf]'") from None
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        docs = []
        for record in stream:
            docs.append(record[text_field])
            if len(docs) >= max_docs:
                break
    except Exception as e:  # datasets raises many types for offline / missing datasets
        raise RankwiseError(f"could not load dataset {name!r} from the hub ({type(e).__name__}: {e}); check the name "
                            "and your internet connection, or pass a local .txt/.jsonl path") from None
    return docs


def documents(spec: str) -> list[str]:
    """The documents of a source spec (see module docstring)."""
    if spec == "stdlib-docs":
        docs = stdlib_docs()
    elif spec == "stdlib-code":
        docs = stdlib_code()
    elif spec.startswith("hf:"):
        docs = hf_documents(spec)
    else:
        docs = local_documents(spec)
    if not docs:
        raise RankwiseError(f"data source {spec!r} holds no text")
    return docs


def fingerprint(spec: str) -> str:
    """A cache key that changes when the source's content may have changed."""
    if spec in BUILTIN_SOURCES:
        key = f"{spec}|{sys.version}"
    elif spec.startswith("hf:"):
        key = spec
    else:
        p = Path(spec)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        key = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())
    return hashlib.sha1(key.encode()).hexdigest()[:16]
