"""Benchmark outputs: ``results.csv``, ``results.md`` (with config and versions), ``bench.json`` (everything,
including per-step histories), ``ppl_vs_memory.png``, ``loss_curves.png``, and the rich table on the terminal."""

from __future__ import annotations

import csv
import io
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic

MB = 2**20

# (csv column, header, formatter) of the summary table
COLUMNS = [
    ("label", "method", str),
    ("eval_ppl", "eval ppl", lambda v: f"{v:.2f}"),
    ("optimizer_state_mb", "optim MB", lambda v: f"{v:.1f}"),
    ("train_mem_mb", "w+g+optim MB", lambda v: f"{v:.1f}"),
    ("peak_mem_mb", "peak MB", lambda v: f"{v:.1f}"),
    ("trainable_params", "trainable", lambda v: f"{v / 1e6:.2f}M"),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
]
CSV_FIELDS = ["label", "method", "options", "lr", "status", "eval_ppl", "eval_loss", "initial_eval_loss",
              "final_train_loss", "trainable_params", "total_params", "weights_mb", "grads_mb", "optimizer_state_mb",
              "train_mem_mb", "planned_mem_mb", "peak_mem_mb", "peak_mem_kind", "tokens", "tokens_per_s", "wall_s"]


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """One flat CSV record (bytes as MiB, options as JSON)."""
    flat = {k: row.get(k) for k in CSV_FIELDS}
    for key in ("weights", "grads", "optimizer_state", "train_mem", "planned_mem", "peak_mem"):
        if row.get(f"{key}_bytes") is not None:
            flat[f"{key}_mb"] = row[f"{key}_bytes"] / MB
    flat["options"] = json.dumps(row.get("options", {}), sort_keys=True)
    return flat


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    info = {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": str(torch.get_num_threads()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        flat = summary(row)
        cells = [fmt(flat[k]) if flat.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        if row.get("status") != "ok":
            cells[1] = row.get("status", "failed")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict[str, Any]], preset, cfg) -> None:
    """Every output file, each written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(summary(r) for r in rows)
    write_text_atomic(out / "results.csv", buf.getvalue())

    env = versions()
    setup = {"preset": cfg.preset, **{k: v for k, v in asdict(preset).items() if k != "methods"},
             "seed": cfg.seed, "overrides": cfg.overrides}
    ok = [r for r in rows if r.get("status") == "ok"]
    tokens = {r["tokens"] for r in ok}
    md = [f"# rankwise bench — preset `{cfg.preset}`", "", preset.description, "", markdown_table(rows), "",
          "Memory columns (MiB): *optim* is the exact size of every tensor in the optimizer's state after the "
          "last step (if that step just dropped some state, as lowrank-rr's momentum reset does, the shape-based "
          "size of the full state); *w+g+optim* adds all parameters and buffers (fp32 master weights, frozen ones "
          "included) and one gradient per trainable parameter (activations excluded); *peak* is the measured "
          f"{ok[0]['peak_mem_kind'] if ok else 'the peak'} of the training loop (on CPU, the resident-set growth: "
          "approximate).", "",
          f"Every method saw the same {', '.join(f'{t:,}' for t in sorted(tokens)) or '-'} training tokens in the "
          f"same order (batch i is a pure function of seed {cfg.seed} and i) under the same schedule.", "",
          "## Setup", "", "```json", json.dumps(setup, indent=1, default=str), "```", "",
          "## Methods", "", "| method | registered method | options | lr |", "|---|---|---|---|",
          *[f"| {r['label']} | {r['method']} | `{json.dumps(r.get('options', {}), sort_keys=True)}` | "
            f"{r.get('lr', '-')} |" for r in rows], "",
          "## Versions", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    write_text_atomic(out / "results.md", "\n".join(md))
    write_text_atomic(out / "bench.json", json.dumps({"setup": setup, "versions": env, "runs": rows}, indent=1,
                                                 default=str))
    plot_ppl_vs_memory(ok, out / "ppl_vs_memory.png")
    plot_loss_curves(ok, out / "loss_curves.png")


def _save(fig, path: Path) -> None:
    from ..plots import save_figure

    save_figure(fig, path)


def plot_ppl_vs_memory(rows: list[dict[str, Any]], path: Path) -> None:
    """Eval perplexity against weights + gradients + optimizer state, one labelled point per method."""
    from ..plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["train_mem_bytes"] / MB, r["eval_ppl"]
        ax.scatter(x, y, s=40)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("weights + gradients + optimizer state (MiB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity vs training memory (lower-left is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss (exponential moving average) per step and validation loss at each evaluation, per method."""
    from ..plots import plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        steps = [h["step"] for h in r["history"]]
        (line,) = ax.plot(steps, _smooth([h["loss"] for h in r["history"]]), lw=1.2, label=r["label"])
        evals = [(h["step"], h["eval_loss"]) for h in r["history"] if "eval_loss" in h]
        if evals:
            ax.plot(*zip(*evals), "o", color=line.get_color(), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): line = train EMA, dots = validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, (_, header, _) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        flat = summary(row)
        cells = [fmt(flat[k]) if flat.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        if row.get("status") != "ok":
            cells[1] = f"[red]{row.get('status', 'failed')}[/]"
        table.add_row(*cells)
    Console().print(table)
