"""Atomic file writes: write to a temp file in the target's folder, then ``os.replace`` — a crash mid-write leaves
the previous file intact and never a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _json_default(obj: Any) -> Any:
    """Numbers that json does not know (numpy / torch scalars) as numbers, anything else as text."""
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default))
