"""``rankwise bench --suite multitask``: LoRA, MixLoRA, SMoRA and FlyLoRA fine-tuned on the same multi-task mixture
(``rankwise.data.multitask``) at equal *activated* rank, from the same base, on the same tokens.

The base is the ``preset`` pre-trained full-rank on the prose task for ``pretrain_steps``; each method then trains
adapters on every linear layer for ``steps`` on the mixture. Reported per method: validation loss of every task,
exact-match accuracy of the synthetic tasks, their averages, activated and total trainable parameters (activated =
what one token uses: active ranks of A and B plus the router), tokens/s. Writes ``results.json``, ``results.md``,
``multitask.png`` (bar charts) and ``routing_<method>.png`` (per-layer expert usage) to ``out_dir``.

Long: a progress bar (plain lines when stderr is not a terminal) counts the training steps of the whole job, with the
method now training and the ETA. Results are written after every run (``"complete": false`` in ``results.json`` and a
note atop ``results.md`` until the last one), with the pre-trained base in ``base.pt``: an interrupted suite keeps
what finished, and a rerun with the same configuration and ``out_dir`` trains only what is missing.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import active_parameterizations
from ..adapters.moe.stats import plot_routing, reset_usage, routing_usage
from ..atomic import write_atomic, write_text_atomic
from ..data import Batches
from ..data.multitask import SYNTHETIC, TASKS, MultiTaskData, exact_match, prepare_multitask
from ..errors import RankwiseError
from ..models import build_model
from ..progress import Progress
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


def planned_runs(cfg: MultitaskConfig) -> int:
    """Fine-tuning runs of the suite: one per method, plus LoRA matched to SMoRA's activated parameters."""
    return len(cfg.methods) + (cfg.matched_lora and "smora" in cfg.methods and "lora" in cfg.methods)


def _resumable(out: Path, cfg: MultitaskConfig) -> list[dict[str, Any]]:
    """The rows an earlier (interrupted) run of the same configuration left in ``out`` (none if there are none)."""
    file = out / "results.json"
    if not file.is_file() or not (out / BASE_FILE).is_file():
        return []
    saved = json.loads(file.read_text())
    ours = json.loads(json.dumps(asdict(cfg), default=str))
    if saved.get("config") != ours:
        changed = sorted(k for k in ours if saved.get("config", {}).get(k) != ours[k])
        raise RankwiseError(f"{out} holds multitask results of another configuration (differs in "
                            f"{', '.join(changed)}); use another --out, or remove it to start over")
    return saved["rows"]


BASE_FILE = "base.pt"


def run_multitask_suite(cfg: MultitaskConfig | dict[str, Any] | None = None,
                        out_dir: str | os.PathLike = "bench-multitask") -> list[dict[str, Any]]:
    """Run the suite; returns one row per method (and one for the base model), also written to ``out_dir``
    after every run (a rerun with the same configuration resumes)."""
    cfg = cfg if isinstance(cfg, MultitaskConfig) else MultitaskConfig(**(cfg or {}))
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    kept = {r["method"]: r for r in _resumable(out, cfg)}
    data = prepare_multitask(cfg.tasks, examples=cfg.examples, seed=cfg.seed, tokens_per_task=cfg.tokens_per_task)
    common = dict(preset=cfg.preset, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype="fp32", eval_every=0,
                  eval_batches=2, seed=cfg.seed, quiet=True, device=cfg.device, warmup_steps=max(1, cfg.steps // 10))
    prose = data.tasks.get("prose", next(iter(data.tasks.values()))).corpus
    planned = planned_runs(cfg)
    done_steps = (cfg.pretrain_steps if kept else 0) + cfg.steps * (len(kept) - 1 if kept else 0)
    progress = Progress("multitask", cfg.pretrain_steps + cfg.steps * planned, done_steps, unit="steps")
    if kept:
        progress.say(f"; resuming from {out}: {len(kept) - 1} of {planned} runs done")
    rows: list[dict[str, Any]] = []
    try:
        if kept:
            base = build_model(cfg.preset, vocab_size=prose.vocab_size, seed=cfg.seed)
            base.load_state_dict(torch.load(out / BASE_FILE, map_location="cpu", weights_only=True))
            base.to(device)
            rows.append(kept["base"])
        else:
            progress.describe("pre-training the base")
            base = train(TrainConfig(method="full", steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, **common),
                         corpus=prose, on_step=lambda row: progress.finish()).model
            write_atomic(out / BASE_FILE, lambda tmp: torch.save(base.state_dict(), tmp))
            rows.append(_summary("base", evaluate_tasks(base, data, cfg, device),
                                 {"activated_params": 0, "trainable_params": 0}))
            _write(out, cfg, rows, planned)
            progress.say("; base pre-trained")
        runs = [(name, name, cfg.method_options(name)) for name in cfg.methods]
        done: dict[str, dict[str, Any]] = {}
        while runs:
            label, name, options = runs.pop(0)
            if label in kept:
                done[label] = kept[label]
                rows.append(done[label])
            else:
                done[label] = _fine_tune(label, name, options, base, data, cfg, common, device, out, progress)
                rows.append(done[label])
                _write(out, cfg, rows, planned)
                progress.say(f"; {label} done (avg loss {done[label]['avg_loss']:.3f})")
            if cfg.matched_lora and label == "smora" and "lora" in done:
                per_rank = done["lora"]["activated_params"] / cfg.method_options("lora")["r"]
                r = max(1, round(done["smora"]["activated_params"] / per_rank))
                runs.append((f"lora r={r}", "lora", {**cfg.method_options("lora"), "r": r}))
    except KeyboardInterrupt:
        progress.close()
        kept_text = (f"{len(rows) - 1} of {planned} runs and the base kept in {out}/results.md (partial)" if rows
                     else "interrupted while pre-training the base: nothing kept")
        print(f"interrupted: {kept_text}; rerun the same command with the same --out to finish", file=sys.stderr)
        raise
    finally:
        progress.close()
    return rows


def _fine_tune(label: str, name: str, options: dict[str, Any], base: nn.Module, data: MultiTaskData,
               cfg: MultitaskConfig, common: dict[str, Any], device: torch.device, out: Path,
               progress: Progress) -> dict[str, Any]:
    """Train method ``name`` from a copy of ``base`` on the mixture; its summary row."""
    progress.describe(label)
    t0 = time.perf_counter()
    res = train(TrainConfig(method=name, method_options=options, steps=cfg.steps, lr=cfg.lr, **common),
                model=copy.deepcopy(base), corpus=data.mixture, on_step=lambda row: progress.finish())
    wall = time.perf_counter() - t0
    active, trainable = activated_params(res.model)
    usage = routing_usage(res.model)
    if usage:
        plot_routing(usage, out / f"routing_{label}.png", f"{label}: expert usage while training")
        reset_usage(res.model)
    return _summary(label, evaluate_tasks(res.model, data, cfg, device), {
        "activated_params": active, "trainable_params": trainable, "tokens_per_s": res.metrics["tokens_per_s"],
        "train_seconds": wall, "options": options})


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


def _write(out: Path, cfg: MultitaskConfig, rows: list[dict[str, Any]], planned: int) -> None:
    """The results so far: ``complete`` once every planned run (besides the base) finished."""
    finished = len(rows) - 1
    complete = finished >= planned
    write_text_atomic(out / "results.json", json.dumps({"config": asdict(cfg), "rows": rows, "complete": complete,
                                                        "runs_planned": planned}, indent=2, default=str))
    note = "" if complete else (f"**Partial**: {finished} of {planned} fine-tuning runs finished; rerun the same "
                                "command with the same --out to finish.\n\n")
    write_text_atomic(out / "results.md", note + markdown_table(rows))
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
