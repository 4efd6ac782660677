"""``rankwise bench --suite multitask``: LoRA, MixLoRA, SMoRA and FlyLoRA fine-tuned on the same multi-task mixture
(``rankwise.data.multitask``) at equal *activated* rank, from the same base, on the same tokens.

The base is the ``preset`` pre-trained full-rank on the prose task for ``pretrain_steps``; each method then trains
adapters on every linear layer for ``steps`` on the mixture. Reported per method: validation loss of every task,
exact-match accuracy of the synthetic tasks, their averages, activated and total trainable parameters (activated =
what one token uses: active ranks of A and B plus the router), tokens/s. Writes ``results.json``, ``results.md``,
``multitask.png`` (bar charts) and ``routing_<method>.png`` (per-layer expert usage) to ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import active_parameterizations
from ..adapters.moe.stats import plot_routing, reset_usage, routing_usage
from ..atomic import write_text_atomic
from ..data import Batches
from ..data.multitask import SYNTHETIC, TASKS, MultiTaskData, exact_match, prepare_multitask
from ..errors import RankwiseError
from ..train import TrainConfig, evaluate, resolve_device, train

METHODS = ("lora", "mixlora", "smora", "flylora")


@dataclass
class MultitaskConfig:
    methods: tuple[str, ...] = METHODS
    active_rank: int = 8          # ranks one token uses, for every method
    total_rank: int = 64          # SMoRA / FlyLoRA rank R, MixLoRA's experts x expert rank
    expert_rank: int = 4          # MixLoRA expert rank (top_k = active_rank / expert_rank)
    alpha: float = 16.0
    target: str = "all-linear"
    preset: str = "tiny"
    pretrain_steps: int = 200
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    pretrain_lr: float = 3e-3
    tasks: tuple[str, ...] = TASKS
    examples: int = 8000
    tokens_per_task: int = 100_000
    eval_batches: int = 4
    accuracy_examples: int = 200
    seed: int = 0
    device: str = "auto"
    matched_lora: bool = True     # also train LoRA with as many activated parameters as SMoRA (router included)
    extra_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method option overrides

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RankwiseError(f"multitask suite: unknown method(s) {', '.join(unknown) or '(none)'}; "
                                f"valid: {', '.join(METHODS)}")
        r, k, rr = self.total_rank, self.active_rank, self.expert_rank
        if not (0 < k <= r and 0 < rr <= k and k % rr == 0 and r % rr == 0):
            raise RankwiseError(f"multitask suite needs 0 < active_rank <= total_rank and expert_rank dividing both; "
                                f"got active_rank={k}, total_rank={r}, expert_rank={rr}")

    def method_options(self, name: str) -> dict[str, Any]:
        """Options that give every method ``active_rank`` ranks per token."""
        common = {"alpha": self.alpha, "target": self.target, "seed": self.seed}
        options = {
            "lora": {"r": self.active_rank},
            "smora": {"r": self.total_rank, "top_k": self.active_rank},
            "flylora": {"r": self.total_rank, "top_k": self.active_rank},
            "mixlora": {"r": self.expert_rank, "num_experts": self.total_rank // self.expert_rank,
                        "top_k": self.active_rank // self.expert_rank},
        }[name]
        return {**common, **options, **self.extra_options.get(name, {})}


def activated_params(model: nn.Module) -> tuple[int, int]:
    """(parameters one token uses, trainable parameters) over the active adapters."""
    active = total = 0
    for p in active_parameterizations(model).values():
        n = sum(t.numel() for t in p.parameters() if t.requires_grad)
        total += n
        active += p.activated_params() if hasattr(p, "activated_params") else n
    return active, total


def evaluate_tasks(model: nn.Module, data: MultiTaskData, cfg: MultitaskConfig, device: torch.device) -> dict:
    """Per task: validation loss (and exact match for synthetic tasks)."""
    out = {}
    for name, task in data.tasks.items():
        batches = Batches(task.corpus.val, cfg.batch_size, cfg.seq_len, cfg.seed).eval_batches(cfg.eval_batches)
        row = {"loss": evaluate(model, batches, device)}
        if task.val_examples:
            row["accuracy"] = exact_match(model, data.tokenizer, task.val_examples[:cfg.accuracy_examples],
                                          device=device)
        out[name] = row
    return out


def _summary(method: str, tasks: dict, extra: dict) -> dict[str, Any]:
    synthetic = [t["accuracy"] for t in tasks.values() if "accuracy" in t]
    return {"method": method, "tasks": tasks, "avg_loss": sum(t["loss"] for t in tasks.values()) / len(tasks),
            "avg_accuracy": sum(synthetic) / len(synthetic) if synthetic else None, **extra}


def run_multitask_suite(cfg: MultitaskConfig | dict[str, Any] | None = None,
                        out_dir: str | os.PathLike = "bench-multitask") -> list[dict[str, Any]]:
    """Run the suite; returns one row per method (and one for the base model), also written to ``out_dir``."""
    cfg = cfg if isinstance(cfg, MultitaskConfig) else MultitaskConfig(**(cfg or {}))
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    data = prepare_multitask(cfg.tasks, examples=cfg.examples, seed=cfg.seed, tokens_per_task=cfg.tokens_per_task)
    common = dict(preset=cfg.preset, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype="fp32", eval_every=0,
                  eval_batches=2, seed=cfg.seed, quiet=True, device=cfg.device, warmup_steps=max(1, cfg.steps // 10))
    prose = data.tasks.get("prose", next(iter(data.tasks.values()))).corpus
    base = train(TrainConfig(method="full", steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, **common), corpus=prose).model
    rows = [_summary("base", evaluate_tasks(base, data, cfg, device), {"activated_params": 0, "trainable_params": 0})]
    runs = [(name, name, cfg.method_options(name)) for name in cfg.methods]
    done: dict[str, dict[str, Any]] = {}
    while runs:
        label, name, options = runs.pop(0)
        t0 = time.perf_counter()
        res = train(TrainConfig(method=name, method_options=options, steps=cfg.steps, lr=cfg.lr, **common),
                    model=copy.deepcopy(base), corpus=data.mixture)
        wall = time.perf_counter() - t0
        active, trainable = activated_params(res.model)
        usage = routing_usage(res.model)
        if usage:
            plot_routing(usage, out / f"routing_{label}.png", f"{label}: expert usage while training")
            reset_usage(res.model)
        done[label] = _summary(label, evaluate_tasks(res.model, data, cfg, device), {
            "activated_params": active, "trainable_params": trainable, "tokens_per_s": res.metrics["tokens_per_s"],
            "train_seconds": wall, "options": options})
        rows.append(done[label])
        if cfg.matched_lora and label == "smora" and "lora" in done:
            per_rank = done["lora"]["activated_params"] / cfg.method_options("lora")["r"]
            r = max(1, round(active / per_rank))
            runs.append((f"lora r={r}", "lora", {**cfg.method_options("lora"), "r": r}))
    _write(out, cfg, rows)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    tasks = list(rows[0]["tasks"])
    head = ["method", *[f"{t} {'acc' if t in SYNTHETIC else 'loss'}" for t in tasks], "avg loss", "avg acc",
            "activated params", "trainable params", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        for t in tasks:
            v = r["tasks"][t]
            cells.append(f"{v['accuracy']:.1%}" if t in SYNTHETIC else f"{v['loss']:.3f}")
        cells += [f"{r['avg_loss']:.3f}", "" if r["avg_accuracy"] is None else f"{r['avg_accuracy']:.1%}",
                  f"{r['activated_params']:,}", f"{r['trainable_params']:,}",
                  f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, cfg: MultitaskConfig, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(out / "results.json", json.dumps({"config": asdict(cfg), "rows": rows}, indent=2, default=str))
    write_text_atomic(out / "results.md", markdown_table(rows))
    plot_bars(rows, out / "multitask.png")


def plot_bars(rows: list[dict[str, Any]], png: Path) -> None:
    """Grouped bars: validation loss per task (left), exact-match accuracy per synthetic task (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from ..plots import plt, save_figure
    import numpy as np

    tasks = list(rows[0]["tasks"])
    synthetic = [t for t in tasks if t in SYNTHETIC]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, names, key, label in ((axes[0], tasks, "loss", "validation loss (nats/token, lower is better)"),
                                  (axes[1], synthetic, "accuracy", "exact match (higher is better)")):
        width = 0.8 / len(rows)
        x = np.arange(len(names))
        for i, r in enumerate(rows):
            ax.bar(x + i * width, [r["tasks"][t][key] for t in names], width, label=r["method"])
        ax.set_xticks(x + 0.4 - width / 2, names)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # outside: no bar hidden
    fig.suptitle("multi-task fine-tuning at equal activated rank")
    save_figure(fig, png, dpi=110)


def config_from_args(args: Any) -> MultitaskConfig:
    """``rankwise bench --suite multitask`` flags (steps, seed, device, batch size, sequence length, learning rate,
    evaluation batches, methods) over the defaults; flags left unset keep them."""
    flags = {"steps": "steps", "seed": "seed", "device": "device", "batch_size": "batch_size", "seq_len": "seq_len",
             "lr": "lr", "eval_batches": "eval_batches"}
    values = {field_: getattr(args, flag) for flag, field_ in flags.items() if getattr(args, flag, None) is not None}
    if getattr(args, "methods", None):
        values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if getattr(args, "rank", None):
        values["active_rank"] = args.rank
    return replace(MultitaskConfig(), **values)


def smoke_config(**overrides: Any) -> MultitaskConfig:
    """A seconds-long configuration (tests, CI)."""
    base = dict(tasks=("prose", "add"), matched_lora=False, examples=200, tokens_per_task=3000, pretrain_steps=1,
                steps=2, batch_size=4, seq_len=32, eval_batches=1, accuracy_examples=8, total_rank=16, active_rank=4,
                expert_rank=2)
    return replace(MultitaskConfig(), **{**base, **overrides})
