"""``run_bench``: every method on the same model, data order, tokens, seed and schedule; one process per method.

    from rankwise.bench import BenchConfig, run_bench
    rows = run_bench(BenchConfig(preset="tiny", methods=["full", "lowrank-rr"], steps=20, out="bench-out"))
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import methods
from ..errors import RankwiseError
from ..train import TrainConfig
from .budget import planned_bytes
from .presets import BenchPreset, MethodSpec, get, parse_method
from .worker import run_job


@dataclass
class BenchConfig:
    preset: str = "tiny"
    methods: list[str] | None = None  # default: the preset's methods
    steps: int | None = None  # default: the preset's; warmup keeps its fraction of the schedule
    rank: int | None = None  # overrides the rank of every method that has one
    budget: str | None = None  # e.g. "24GB": only methods whose planned memory fits
    out: str = "bench-out"
    seed: int = 0
    device: str = "auto"
    isolate: bool = True  # one fresh process per method (honest peak memory); False: in this process
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (batch_size, seq_len, lr, dtype...)


@dataclass(frozen=True)
class Entry:
    label: str
    spec: MethodSpec


def resolve(cfg: BenchConfig) -> tuple[BenchPreset, list[Entry]]:
    """The preset (with ``steps`` and overrides applied) and the validated method entries."""
    preset = get(cfg.preset)
    if cfg.steps is not None:
        if cfg.steps <= 0:
            raise RankwiseError(f"steps must be a positive integer, got {cfg.steps}")
        warmup = round(preset.warmup_steps * cfg.steps / preset.steps)
        preset = replace(preset, steps=cfg.steps, warmup_steps=warmup, eval_every=min(preset.eval_every, cfg.steps))
    specs = cfg.methods or list(preset.methods)
    if not specs:
        raise RankwiseError("no method to run; name some with --methods (see `rankwise methods`)")
    entries = []
    for text in specs:
        label, spec = parse_method(text, preset)
        info = methods.info(spec.method)  # raises the unknown-method error, listing the valid ones
        if cfg.rank is not None and "rank" in info.options():
            spec = replace(spec, options={**spec.options, "rank": cfg.rank})
        methods.get(spec.method, **spec.options)  # validates the options before anything runs
        entries.append(Entry(label, spec))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise RankwiseError(f"--methods names a method twice: {', '.join(labels)}")
    return preset, entries


def train_config(preset: BenchPreset, entry: Entry, cfg: BenchConfig) -> TrainConfig:
    base = TrainConfig(preset=preset.model, method=entry.spec.method, method_options=dict(entry.spec.options),
                       data=preset.data, vocab_size=preset.vocab_size, steps=preset.steps,
                       batch_size=preset.batch_size, grad_accum=preset.grad_accum, seq_len=preset.seq_len,
                       lr=preset.lr, warmup_steps=preset.warmup_steps, dtype=preset.dtype, seed=cfg.seed,
                       eval_every=preset.eval_every, eval_batches=preset.eval_batches, checkpoint_every=0,
                       out=None, device=cfg.device, quiet=True)
    unknown = sorted(set(cfg.overrides) - set(asdict(base)))
    if unknown:
        raise RankwiseError(f"unknown training setting(s) {', '.join(unknown)}")
    for key, value in cfg.overrides.items():
        if value is not None:
            setattr(base, key, value)
    base.lr *= entry.spec.lr_scale
    base.validate()
    return base


def select_by_budget(configs: dict[str, TrainConfig], entries: list[Entry], budget: str,
                     log: Callable[[str], None]) -> tuple[list[Entry], dict[str, int]]:
    """Entries whose planned memory (``rankwise.plan``: weights, gradients, optimizer state and activations of one
    micro-batch) fits in ``budget``; their planned bytes."""
    from ..plan import parse_bytes

    limit = parse_bytes(budget)
    planned = {}
    for e in entries:
        c = configs[e.label]
        planned[e.label] = planned_bytes(c.preset, c.method, c.method_options, c.batch_size, c.seq_len, c.dtype,
                                         c.vocab_size)
    fits = [e for e in entries if planned[e.label] <= limit]
    for e in entries:
        if e not in fits:
            log(f"skip {e.label}: planned {planned[e.label] / 2**30:.2f} GiB > budget {limit / 2**30:.2f} GiB")
    if not fits:
        smallest = min(planned.values())
        raise RankwiseError(f"no method fits in {budget}: the smallest plan needs {smallest / 2**30:.2f} GiB "
                            "(`rankwise plan` details it); raise --budget or use a smaller --preset")
    return fits, planned


def _run_isolated(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    job_path = run_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    log_path = run_dir / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "rankwise.bench", str(job_path)], stdout=log,
                              stderr=subprocess.STDOUT, env=os.environ.copy())
    result = run_dir / "result.json"
    if proc.returncode != 0 or not result.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        return {"label": job["label"], "method": job["config"]["method"], "status": f"failed: {tail[0][:200]}"}
    return json.loads(result.read_text())


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every entry, write the results to ``cfg.out`` and return one record per method."""
    from ..data import prepare
    from .report import write_results

    preset, entries = resolve(cfg)
    configs = {e.label: train_config(preset, e, cfg) for e in entries}
    planned: dict[str, int] = {}
    if cfg.budget:
        entries, planned = select_by_budget(configs, entries, cfg.budget, log)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for data, vocab in {(c.data, c.vocab_size) for c in configs.values()}:
        prepare(data, vocab)  # build the corpus cache once, before the workers share it
    rows = []
    for i, e in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {e.label}: {e.spec.method} {json.dumps(e.spec.options)} "
            f"lr {configs[e.label].lr:g}")
        run_dir = out / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", e.label)
        job = {"label": e.label, "config": asdict(configs[e.label]), "run_dir": str(run_dir)}
        start = time.perf_counter()
        row = _run_isolated(job, run_dir) if cfg.isolate else run_job(job)
        row.setdefault("wall_s", time.perf_counter() - start)
        if e.label in planned:
            row["planned_mem_bytes"] = planned[e.label]
        rows.append(row)
        if row["status"] == "ok":
            log(f"    eval ppl {row['eval_ppl']:.2f}, {row['tokens_per_s']:,.0f} tokens/s, {row['wall_s']:.0f} s")
        else:
            log(f"    {row['status']} (log: {run_dir / 'log.txt'})")
    write_results(out, rows, preset, cfg)
    return rows
