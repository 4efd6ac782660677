"""Optional experiment loggers for ``rankwise train --log tensorboard|wandb`` (and ``bench --log``), through their own
libraries; absent by default (``metrics.jsonl`` is always written).

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in ``LOG_DIR/tensorboard`` (needs the
  ``tensorboard`` package: ``pip install 'rankwise[tensorboard]'``); view with ``tensorboard --logdir LOG_DIR``.
- ``wandb``: ``wandb.init(project="rankwise", dir=LOG_DIR, name=<folder name>, config=<the run's config>)``
  (``pip install 'rankwise[wandb]'``; ``WANDB_MODE=offline`` logs without an account, ``WANDB_PROJECT`` renames
  the project).

Every numeric value of a step's ``metrics.jsonl`` row (``loss``, ``lr``, ``tokens_per_s``, ``grad_norm``,
``eval_loss``, ``eval_ppl``, ...) is logged at that step under ``train/<key>`` (``eval/<key>`` for the eval ones), and
the final metrics under ``final/<key>``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import RankwiseError

LOGGERS = ("tensorboard", "wandb")
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logger(kind: str | None) -> None:
    """Raise a ``RankwiseError`` naming the extra to install unless ``kind`` is None or usable here."""
    if kind is None:
        return
    if kind not in LOGGERS:
        raise RankwiseError(f"unknown logger {kind!r}; valid: {', '.join(LOGGERS)}")
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        else:
            import wandb  # noqa: F401
    except ImportError:
        raise RankwiseError(f"--log {kind} needs the {EXTRA[kind]} package: pip install 'rankwise[{EXTRA[kind]}]'"
                            ) from None


def _scalars(row: dict[str, Any], prefix: str | None = None) -> dict[str, float]:
    """The finite numeric values of ``row`` (not ``step``), tagged ``train/``, ``eval/`` or ``prefix/``."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[f"{prefix or ('eval' if k.startswith('eval_') else 'train')}/{k}"] = float(v)
    return out


class MetricLogger:
    """One run's logger: ``log(row)`` per step, ``finish(metrics)`` once at the end, ``close()`` always."""

    def __init__(self, kind: str, log_dir: str | os.PathLike, config: dict[str, Any]):
        check_logger(kind)
        self.kind, self.dir = kind, Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            self.writer.add_text("config", f"```\n{config}\n```")
        else:
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rankwise"), dir=str(self.dir),
                                  name=self.dir.resolve().name, config=config)

    def log(self, row: dict[str, Any], step: int | None = None, prefix: str | None = None) -> None:
        step = row["step"] if step is None else step
        values = _scalars(row, prefix)
        if self.kind == "tensorboard":
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        elif values:
            self.run.log(values, step=step)

    def finish(self, metrics: dict[str, Any]) -> None:
        self.log(metrics, step=metrics.get("steps") or 0, prefix="final")

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()
