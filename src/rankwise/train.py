"""The training loop: any method, any causal LM, honest metrics, atomic checkpoints, bit-exact resume.

    res = train(TrainConfig(preset="tiny", method="galore", method_options={"rank": 32}, steps=200))
    res.metrics["eval_ppl"]

Per run, ``OUT`` receives ``metrics.jsonl`` (one line per step, flushed as it goes), ``metrics.json`` (final),
``train_config.json`` (``config.json`` before; renamed so that it never collides with transformers' file),
``loss_curve.png``, the tokenizer (``save_pretrained``: ``AutoTokenizer.from_pretrained(OUT)`` loads it) and
``checkpoint.pt`` (model + optimizer + scheduler + method + RNG + step; written atomically every
``checkpoint_every`` steps, at the end, and on Ctrl-C).

Tokenizer: a run tokenizes with its model's own tokenizer (``--model``, ``--resume``, a preset folder that has one);
only pre-training from scratch (a preset) trains a new byte-level BPE on the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .atomic import write_json_atomic
from . import distributed
from . import methods as methods_mod
from .data import Batches, TokenizedCorpus, prepare
from .errors import RankwiseError
from .methods import Method, OptimConfig
from .metrics import PeakMemory, optimizer_state_bytes
from .models import PRESETS, TRAIN_CONFIG, build_model, count_params, load_pretrained, max_positions, model_tokenizer

log = logging.getLogger("rankwise")


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: str | None = None  # start from pretrained weights: a run folder, transformers folder or hub name
    method: str = "full"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: str = "stdlib-docs"
    vocab_size: int = 8192
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    dtype: str = "bf16"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    stop_at: int | None = None
    out: str | None = None
    resume: str | None = None
    device: str = "auto"
    parallel: str = "ddp"  # with several processes (torchrun): ddp or fsdp (FSDP2 fully_shard)
    quantize: str | None = None  # nf4 / int8: frozen quantized base for adapter methods (rankwise.quant)
    quiet: bool = False

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise RankwiseError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise RankwiseError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RankwiseError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RankwiseError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.parallel not in distributed.MODES:
            raise RankwiseError(f"unknown parallel mode {self.parallel!r}; valid: {', '.join(distributed.MODES)}")
        if self.quantize is not None and self.quantize not in ("nf4", "int8"):
            raise RankwiseError(f"unknown quantize {self.quantize!r}; valid: nf4, int8")
        if self.quantize and self.parallel == "fsdp":
            raise RankwiseError("--quantize does not shard with --parallel fsdp yet (quantized tensors split unevenly "
                                "across ranks); use --parallel ddp")
        if self.dtype not in ("fp32", "bf16"):
            raise RankwiseError(f"unknown dtype {self.dtype!r}; valid: fp32, bf16")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise RankwiseError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise RankwiseError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class RunResult:
    metrics: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: Method
    history: list[dict[str, Any]]


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankwiseError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a (B, T+1) batch, computed in fp32."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: str = "fp32") -> float:
    """Mean next-token loss over ``batches`` (each weighted by its token count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast(device, dtype):
        for batch in batches:
            batch = batch.to(device)
            n = batch[:, 1:].numel()
            total += lm_loss(model, batch).item() * n
            count += n
    model.train(was_training)
    return total / count


def _check_fits(cfg: TrainConfig, model: nn.Module, vocab_size: int) -> None:
    positions = max_positions(model)
    if positions is not None and cfg.seq_len > positions:
        raise RankwiseError(f"seq_len {cfg.seq_len} is larger than the model's {positions} positions; "
                            f"use --seq-len {positions} or less")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and vocab < vocab_size:
        fix = (f"use --vocab-size {vocab} or a larger model" if cfg.model is None and not cfg.resume else
               "the model and its tokenizer do not match; save the model's own tokenizer in its folder")
        raise RankwiseError(f"the model's vocabulary ({vocab}) is smaller than the tokenizer's "
                            f"({vocab_size}); {fix}")


def read_train_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The training config of a run folder: ``train_config.json``, or ``config.json`` in runs before that name."""
    for name in (TRAIN_CONFIG, "config.json"):
        path = Path(run_dir) / name
        if path.exists():
            d = json.loads(path.read_text())
            if "method" in d and "preset" in d:  # not a transformers config.json
                return TrainConfig.from_dict(d)
    return TrainConfig.from_dict(ckpt.load(run_dir)["config"])


def run_tokenizer(run_dir: str | os.PathLike):
    """The tokenizer a run trained with: the one saved in its folder, else (runs before tokenizers were saved) the
    one it used: its base model's, or the BPE of its data (rebuilt from the cache, deterministically)."""
    from .data.tokenizer import has_tokenizer, load_pretrained_tokenizer

    if has_tokenizer(run_dir):
        return load_pretrained_tokenizer(str(run_dir))
    cfg = read_train_config(run_dir)
    if cfg.model is not None:
        return model_tokenizer(cfg.model)
    return model_tokenizer(cfg.preset) or prepare(cfg.data, cfg.vocab_size).hf_tokenizer


def _tokenizer_for(cfg: TrainConfig):
    """The tokenizer of the model this run starts from; ``None`` when pre-training from scratch (new BPE)."""
    if cfg.resume:
        return run_tokenizer(cfg.resume)
    return model_tokenizer(cfg.model if cfg.model is not None else cfg.preset)


class _Output:
    """Everything a run writes under OUT."""

    def __init__(self, out: str | None, resumed_step: int):
        self.dir = Path(out) if out else None
        self._jsonl = None
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        kept = []
        if resumed_step and path.exists():  # drop records past the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))
        self._jsonl = path.open("a")

    def record(self, row: dict[str, Any]) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def write_json(self, name: str, obj: Any) -> None:
        if self.dir:
            write_json_atomic(self.dir / name, obj, indent=2)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()


def _progress(cfg: TrainConfig, start: int):
    """A rich progress bar (or nothing when quiet) and a function to update it."""
    if cfg.quiet:
        return contextlib.nullcontext(), lambda step, info: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{cfg.method}[/] {cfg.preset}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
    task = bar.add_task("train", total=cfg.steps, completed=start, info="")
    return bar, lambda step, info: bar.update(task, completed=step, info=info)


def train(cfg: TrainConfig, model: nn.Module | None = None, method: Method | None = None,
          corpus: TokenizedCorpus | None = None, on_step: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Train ``model`` (default: the preset, randomly initialised) with ``method`` (default: ``cfg.method``)."""
    cfg.validate()
    if model is None and cfg.preset not in PRESETS and not os.path.isdir(cfg.preset):
        build_model(cfg.preset)  # raises the unknown-preset error before anything is written
    method = method or methods_mod.get(cfg.method, **cfg.method_options)
    state = ckpt.load(cfg.resume) if cfg.resume else None
    device = resolve_device(cfg.device)
    dist = distributed.setup(cfg.parallel, cfg.batch_size, device)  # None in a single process
    device = dist.device if dist else device
    corpus = corpus or prepare(cfg.data, cfg.vocab_size, tokenizer=_tokenizer_for(cfg))
    train_data = Batches(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    eval_data = Batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.seed).eval_batches(cfg.eval_batches)

    model = _build_model(cfg, model, method, corpus.vocab_size, train_data, device)
    model.train()
    engine = distributed.wrap(model, dist)  # what forward/backward run through (DDP, or model sharded in place)
    optimizer = method.build_optimizer(model, OptimConfig(cfg.lr, cfg.weight_decay, cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio) * method.lr_factor(s))
    trainable, total = count_params(model)

    start, initial_eval, train_time, tokens_done = 0, None, 0.0, 0
    if state is not None:
        distributed.load(dist, model, optimizer, state, cfg.resume)
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # torch.distributed.checkpoint restores tensors, not the groups' floats
        method.load_state_dict(state["method"])
        ckpt.set_rng_state(state["rng"])
        start, initial_eval = state["step"], state["initial_eval_loss"]
        train_time, tokens_done = state["train_time"], state["tokens"]
        if start >= cfg.steps:
            raise RankwiseError(f"the checkpoint in {cfg.resume!r} is already at step {start} of {cfg.steps}; "
                                "raise --steps to train further")
    out = _Output(cfg.out if dist is None or dist.main else None, start)
    out.write_json(TRAIN_CONFIG, _describe(cfg, method))
    if out.dir:
        corpus.save_tokenizer(out.dir)
    if initial_eval is None:
        initial_eval = evaluate(model, eval_data, device, cfg.dtype)
        out.record({"step": 0, "eval_loss": initial_eval, "eval_ppl": math.exp(initial_eval)})

    def save(step: int) -> None:
        payload = {"scheduler": scheduler.state_dict(), "method": method.state_dict(), "rng": ckpt.rng_state(),
                   "step": step, "initial_eval_loss": initial_eval, "train_time": train_time,
                   "tokens": tokens_done, "config": asdict(cfg)}
        if dist is not None and cfg.out:
            distributed.save(dist, model, optimizer, payload, Path(cfg.out), step)
        elif out.dir:
            ckpt.save_atomic({**payload, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                             out.dir / ckpt.CHECKPOINT_FILE)

    history: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    last = cfg.stop_at or cfg.steps
    params = [p for p in model.parameters() if p.requires_grad]
    bar, show = _progress(cfg, start)
    step, updating = start, False
    eval_loss = initial_eval
    with PeakMemory(device) as peak, bar:
        try:
            for step in range(start + 1, last + 1):
                t0 = time.perf_counter()
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    batch = train_data.train_batch((step - 1) * cfg.grad_accum + micro)
                    batch = distributed.shard_batch(batch, dist).to(device)
                    with autocast(device, cfg.dtype):
                        loss = lm_loss(engine, batch)
                        aux = method.aux_loss(model)
                    total_loss = loss if aux is None else loss + aux
                    (total_loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                loss_sum = distributed.mean(loss_sum, dist)
                grad_norm = None
                if cfg.grad_clip > 0 and any(p.grad is not None for p in params):
                    grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip), dist)
                lr = optimizer.param_groups[0]["lr"]
                updating = True  # from here on the step is half applied until it completes
                optimizer.step()
                distributed.reshard_state(optimizer, dist)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step(step, model, optimizer)
                updating = False
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                train_time += dt
                tokens_done += tokens_per_step
                row = {"step": step, "loss": loss_sum / cfg.grad_accum, "lr": lr, "tokens_per_s": tokens_per_step / dt}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if aux is not None:
                    row["aux_loss"] = aux.item()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == last:
                    eval_loss = evaluate(model, eval_data, device, cfg.dtype)
                    row.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
                history.append(row)
                out.record(row)
                if on_step:
                    on_step(row)
                show(step, f"loss {row['loss']:.3f}  {tokens_done / train_time:,.0f} tok/s")
                if cfg.quiet and (step % 10 == 0 or step == last):
                    log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, cfg.steps, row["loss"], lr,
                             row["tokens_per_s"])
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != last:
                    save(step)
        except KeyboardInterrupt:
            if not updating:  # interrupted in forward/backward: the weights are those of the last finished step
                save(step - 1)
            out.close()
            raise
    save(step)

    metrics = {
        "method": method.name, "preset": cfg.preset, "steps": step,
        "initial_eval_loss": initial_eval, "final_eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss),
        "final_train_loss": history[-1]["loss"] if history else None,
        "tokens": tokens_done, "tokens_per_s": tokens_done / train_time if train_time else None,
        "peak_mem_bytes": peak.peak, "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta",
        "optimizer_state_bytes": optimizer_state_bytes(optimizer) if dist is None else
        distributed.local_state_bytes(optimizer),
        "trainable_params": trainable, "total_params": total,
        "config": _describe(cfg, method),
    }
    if dist is not None:
        metrics.update(world_size=dist.world, parallel=dist.mode)
    out.write_json("metrics.json", metrics)
    out.close()
    if out.dir:
        from .export import save_run_adapter

        save_run_adapter(model, out.dir, cfg.model or cfg.preset)
    if out.dir:
        from .plots import loss_curve

        loss_curve(out.dir / "metrics.jsonl", out.dir / "loss_curve.png", title=f"{method.name} on {cfg.preset}")
    return RunResult(metrics, model, optimizer, method, history)


def _build_model(cfg: TrainConfig, model: nn.Module | None, method: Method, vocab_size: int,
                 train_data: Batches | None, device: torch.device) -> nn.Module:
    """The given model, else ``cfg.model``'s pretrained weights, else the preset (random init, ``vocab_size``
    tokens), checked against the data, calibrated on ``train_data`` and prepared by the method."""
    torch.manual_seed(cfg.seed)
    if model is None and cfg.model is not None:
        model = load_pretrained(cfg.model)
    elif model is None:
        model = build_model(cfg.preset, vocab_size=vocab_size, seed=cfg.seed)
    _check_fits(cfg, model, vocab_size)
    model.to(device)
    if method.calibration_batches:
        method.calibrate(model, [train_data.train_batch(-1 - i).to(device) for i in range(method.calibration_batches)])
    model = method.prepare(model)
    if cfg.quantize:
        from .quant import quantize_method_base

        model = quantize_method_base(model, method, cfg.quantize)
    return model.to(device)


@dataclass
class LoadedRun:
    model: nn.Module  # as trained: the method's layers in place, the checkpoint's weights loaded
    config: TrainConfig
    state: dict[str, Any]
    tokenizer: Any  # the run's transformers tokenizer


def load_run(run_dir: str, device: str | torch.device = "cpu") -> LoadedRun:
    """The model saved in ``run_dir`` (by ``train`` with ``out=run_dir``), rebuilt with its method, and its
    tokenizer. Methods that calibrate on data before ``prepare`` (LoRA-GA, ...) get the run's own training data."""
    state = ckpt.load(run_dir)
    cfg = TrainConfig.from_dict(state["config"])
    dev = resolve_device(device) if isinstance(device, str) else device
    method = methods_mod.get(cfg.method, **cfg.method_options)
    tokenizer = run_tokenizer(run_dir)
    corpus = prepare(cfg.data, tokenizer=tokenizer) if method.calibration_batches else None
    train_data = Batches(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed) if corpus is not None else None
    vocab = tokenizer.backend_tokenizer.get_vocab_size()
    model = _build_model(cfg, None, method, vocab, train_data, dev)
    distributed.load_full_model(model, state, run_dir)
    return LoadedRun(model, cfg, state, tokenizer)


def evaluate_checkpoint(run_dir: str, data: str | None = None, eval_batches: int | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Validation loss of the model saved in ``run_dir``, on its own data or on ``data``, always tokenized with the
    run's own tokenizer (``data``'s validation split: ``prepare(data, tokenizer=...)``)."""
    run = load_run(run_dir, resolve_device(device))
    cfg = run.config
    cfg.data = data or cfg.data
    cfg.eval_batches = eval_batches or cfg.eval_batches
    cfg.validate()
    corpus = prepare(cfg.data, tokenizer=run.tokenizer)
    batches = Batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.seed).eval_batches(cfg.eval_batches)
    loss = evaluate(run.model, batches, next(run.model.parameters()).device, cfg.dtype)
    return {"method": cfg.method, "data": cfg.data, "step": run.state["step"], "eval_loss": loss,
            "eval_ppl": math.exp(loss), "seq_len": cfg.seq_len, "tokens": sum(b[:, 1:].numel() for b in batches)}


def _describe(cfg: TrainConfig, method: Method) -> dict[str, Any]:
    return {**asdict(cfg), "method_options": method.describe(), "torch": torch.__version__,
            "python": platform.python_version()}
