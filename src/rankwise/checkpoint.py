"""Atomic checkpoints: everything a run needs to continue bit-exactly, written with temp file + rename."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import explained_errors, temp_file
from .errors import RankwiseError

CHECKPOINT_FILE = "checkpoint.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash mid-write leaves the
    previous file intact (and at most a ``.checkpoint.pt.XXXX.tmp`` that the next start removes)."""
    path = Path(path)
    with explained_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what ``rankwise train`` writes into every checkpoint (plus "model" and "optimizer", or "sharded" under FSDP)
REQUIRED_KEYS = ("scheduler", "method", "rng", "step", "initial_eval_loss", "train_time", "tokens", "config")


def load(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint of the run in ``directory`` (a ``rankwise train --out`` folder), checked for completeness."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise RankwiseError(f"no checkpoint at {str(path)!r}; pass the --out folder of a `rankwise train` run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RankwiseError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise RankwiseError(f"checkpoint {str(path)!r} is not a `rankwise train` checkpoint (it holds a "
                            f"{type(state).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if "sharded" not in state:
        missing += [k for k in ("model", "optimizer") if k not in state]
    if missing:
        raise RankwiseError(f"checkpoint {str(path)!r} lacks {', '.join(map(repr, missing))}: it was not written "
                            "by `rankwise train`, or is damaged; start a new run with --overwrite")
    return state
