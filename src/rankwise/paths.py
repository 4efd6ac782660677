"""Output paths checked before any work starts: every command that writes calls ``check_out_dir`` /
``check_out_file`` first, so a bad ``--out`` is one clear error and nothing is computed or written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import RankwiseError

# What `rankwise train` writes into its --out (a folder holding any of them "holds a run").
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "metrics.json", "config.json", "train_config.json", "loss_curve.png")
SHARDED_PREFIX = "checkpoint_dcp-"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """``path`` does not exist yet (or is a folder): its nearest existing ancestor is a writable folder."""
    ancestor = _existing_ancestor(path.parent if not path.exists() else path)
    if not ancestor.is_dir():
        raise RankwiseError(f"{flag} {str(path)!r} is under {str(ancestor)!r}, which is a file; choose a path in "
                            "a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RankwiseError(f"{flag} {str(path)!r}: {str(ancestor)!r} is not writable (read-only filesystem or "
                            "no permission); choose a writable folder")


def check_out_dir(path: str | os.PathLike | None, flag: str = "--out") -> None:
    """``path`` can be (or become) a writable folder."""
    if path is None:
        return
    if str(path).strip() == "":
        raise RankwiseError(f"{flag} '' is not a folder; give a folder path, or omit {flag} to write nothing")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RankwiseError(f"{flag} {str(p)!r} is an existing file, not a folder; choose a folder")
    _check_creatable(p, flag)


def check_out_file(path: str | os.PathLike | None, flag: str) -> None:
    """A file can be written at ``path`` (it may exist and is then replaced)."""
    if path is None:
        return
    if str(path).strip() == "":
        raise RankwiseError(f"{flag} '' is not a file path; give one, or omit {flag}")
    p = Path(path)
    if p.is_dir():
        raise RankwiseError(f"{flag} {str(p)!r} is a folder; give a file path such as {str(p / 'plot.png')!r}")
    _check_creatable(p, flag)


def run_files(directory: str | os.PathLike) -> list[str]:
    """The names of the run files (and FSDP checkpoint folders) in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted([f for f in RUN_FILES if (d / f).exists()] +
                  [p.name for p in d.glob(f"{SHARDED_PREFIX}*") if p.is_dir()])


def check_new_run(directory: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite``."""
    if directory is None or overwrite:
        return
    found = run_files(directory)
    if found:
        resume = (f"continue it with --resume {directory}, " if "checkpoint.pt" in found else "")
        raise RankwiseError(f"--out {str(directory)!r} already holds a run ({', '.join(found[:3])}); "
                            f"{resume}replace it with --overwrite, or choose another --out")


def clear_run(directory: str | os.PathLike) -> None:
    """Remove an earlier run's files from ``directory`` (``--overwrite``); other files are left alone."""
    d = Path(directory)
    for name in run_files(d):
        target = d / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
