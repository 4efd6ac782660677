"""One benchmark run: ``python -m rankwise.bench JOB.json --parent PID`` trains one method and writes
``result.json`` (the bench reads it, and a rerun skips the run when it is there with the same ``job.json``).

Each run has a fresh process (by default) so that its peak memory and throughput are its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json_atomic
from ..errors import RankwiseError
from .budget import optimizer_state_estimate

def memory_breakdown(model: torch.nn.Module, optimizer_state_bytes: int) -> dict[str, int]:
    """Bytes of weights (all parameters and buffers), gradients (trainable parameters) and optimizer state."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"weights_bytes": weights, "grads_bytes": grads, "optimizer_state_bytes": optimizer_state_bytes,
            "train_mem_bytes": weights + grads + optimizer_state_bytes}


def load_average() -> float | None:
    """The 1-minute load average (``os.getloadavg``), or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train ``job["config"]`` (a ``TrainConfig`` as a dict); write and return the result record."""
    from ..train import TrainConfig, train

    cfg = TrainConfig.from_dict(job["config"])
    start, load_start = time.perf_counter(), load_average()
    threads = torch.get_num_threads()
    torch.set_num_threads(job.get("threads", threads))
    try:
        res = train(cfg)
    finally:
        torch.set_num_threads(threads)
    m = res.metrics
    # a method may have just dropped its factors' state (lowrank-rr, at a refactorization step): report the
    # steady-state size, the larger of the exact final bytes and the shape-based size of the full state
    try:
        optimizer_state = max(m["optimizer_state_bytes"], optimizer_state_estimate(res.optimizer))
    except RankwiseError:  # no shape formula for this optimizer: the exact final bytes
        optimizer_state = m["optimizer_state_bytes"]
    record = {
        "label": job["label"], "group": job.get("group", job["label"]), "budget": job.get("budget"),
        "seed": cfg.seed, "method": cfg.method, "options": m["config"]["method_options"], "lr": cfg.lr,
        "initial_eval_loss": m["initial_eval_loss"], "eval_loss": m["final_eval_loss"], "eval_ppl": m["eval_ppl"],
        "final_train_loss": m["final_train_loss"], "trainable_params": m["trainable_params"],
        "total_params": m["total_params"], "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
        "peak_mem_bytes": m["peak_mem_bytes"], "peak_mem_kind": m["peak_mem_kind"],
        **memory_breakdown(res.model, optimizer_state), "final_optimizer_state_bytes": m["optimizer_state_bytes"],
        "wall_s": time.perf_counter() - start, "status": "ok",
        "load_avg_start": load_start, "load_avg_end": load_average(), "cpu_count": os.cpu_count(),
        "threads": job.get("threads", threads),
        "history": res.history, "config": m["config"],
    }
    out = Path(job["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "result.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the loop logs every 10 steps when quiet
    run_job(json.loads(Path(args[0]).read_text()))
    return 0
