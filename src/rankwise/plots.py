"""Plots written next to a run's metrics (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import write_atomic  # noqa: E402


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_figure(fig, path: str | Path, dpi: int = 120, tight: bool = True) -> None:
    """Lay out (``tight_layout`` unless ``tight=False``, e.g. a colorbar shared by several axes), write atomically
    (PNG unless the suffix says otherwise) and close ``fig``."""
    if tight:
        fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    plt.close(fig)


def loss_curve(metrics_jsonl: str | Path, png: str | Path, title: str = "") -> None:
    """Training loss per step and validation loss at each evaluation."""
    rows = read_jsonl(metrics_jsonl)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png)
