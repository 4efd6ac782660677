"""Atomic file writes: write to a temp file in the target's folder, then ``os.replace`` — a crash mid-write leaves
the previous file intact and never a half-written one.

Temp files are named ``.NAME.XXXX.tmp`` (``clean_stale`` removes those a killed process left behind) and get the
mode an ``open()`` would give (0666 minus the umask), not ``mkstemp``'s 0600. A full disk or a read-only folder
becomes one ``RankwiseError`` naming the file; a Ctrl-C that torch's zip writer turned into a ``RuntimeError`` is
a ``KeyboardInterrupt`` again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RankwiseError

TMP_SUFFIX = ".tmp"


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 minus the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0777 minus the umask."""
    return 0o777 & ~umask()


def temp_file(path: str | os.PathLike) -> tuple[int, str]:
    """``mkstemp`` next to ``path`` (``.NAME.XXXX.tmp``), chmod-ed to the umask's file mode: (fd, temp path)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.fchmod(fd, file_mode())
    return fd, tmp


def clean_stale(directory: str | os.PathLike) -> list[str]:
    """Remove the ``.NAME.XXXX.tmp`` files an interrupted writer left in ``directory``; returns their names.

    Call it only where no other process is writing into ``directory`` (a run's own --out, at its start)."""
    removed = []
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p.name)
    return removed


_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def explained_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk / read-only folder into one ``RankwiseError`` naming ``path``, and a ``KeyboardInterrupt``
    that torch's C++ writer wrapped in a ``RuntimeError`` (the cause is kept in ``__context__``) back into one."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, (KeyboardInterrupt, OSError)):
            cause = cause.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if isinstance(cause, OSError) and cause.errno in _SPACE:
            raise RankwiseError(f"no space left on the device writing {str(path)!r}; free some space or choose "
                                "another folder (the previous file is kept)") from None
        if isinstance(cause, OSError) and cause.errno in _DENIED:
            raise RankwiseError(f"cannot write {str(path)!r}: {os.strerror(cause.errno)}; choose a writable "
                                "folder") from None
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    with explained_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, so that it is valid JSON (``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    """Numbers that json does not know (numpy / torch scalars) as numbers (null when not finite), else text."""
    if hasattr(obj, "item"):
        try:
            return finite(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def json_dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that always writes valid JSON: NaN / inf become ``null``."""
    return json.dumps(finite(obj), indent=indent, default=_json_default, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    write_text_atomic(path, json_dumps(obj, indent=indent))
