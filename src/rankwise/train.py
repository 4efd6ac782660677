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
import inspect
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import paths
from .atomic import clean_stale, explained_errors, json_dumps, write_json_atomic, write_text_atomic
from . import distributed
from . import methods as methods_mod
from .data import Batches, LabeledBatch, TokenizedCorpus, prepare, target_count
from .errors import NonFiniteError, RankwiseError
from .loggers import MetricLogger, check_logger
from .methods import Method, OptimConfig
from .metrics import PeakMemory
from .models import PRESETS, TRAIN_CONFIG, build_model, count_params, load_pretrained, max_positions, model_tokenizer

log = logging.getLogger("rankwise")


NONFINITE_POLICIES = ("stop", "skip")

# Settings a resumed run may change freely: they do not change what is computed (``steps``: see ``schedule_steps``).
RESUME_FREE = frozenset({"steps", "stop_at", "out", "resume", "device", "parallel", "quiet", "checkpoint_every",
                         "eval_every", "on_nonfinite", "overwrite", "extend", "allow_change", "schedule_steps",
                         "log", "log_dir"})
# Settings of one invocation, not of the run: a resumed run starts with their defaults.
PER_CALL = ("stop_at", "out", "resume", "overwrite", "extend", "allow_change", "quiet")

_INTS = ("vocab_size", "steps", "batch_size", "grad_accum", "seq_len", "warmup_steps", "seed", "eval_every",
         "eval_batches", "checkpoint_every")
_OPTIONAL_INTS = ("stop_at", "schedule_steps")
_FLOATS = ("lr", "min_lr_ratio", "weight_decay", "grad_clip")
_STRS = ("preset", "method", "data", "dtype", "device", "parallel", "on_nonfinite")
_OPTIONAL_STRS = ("out", "resume", "log", "log_dir")
_BOOLS = ("quiet", "overwrite", "extend", "pack")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    pack: bool = True  # instruction data: pack examples into windows (False: one right-padded example per row)
    quiet: bool = False
    on_nonfinite: str = "stop"  # a non-finite loss / gradient norm: stop (keep the last good checkpoint) or skip
    overwrite: bool = False  # start a new run in an --out that holds one (its run files are removed first)
    schedule_steps: int | None = None  # horizon of the cosine schedule; None: ``steps`` (a resumed run keeps its own)
    extend: bool = False  # with resume: stretch the schedule's horizon to the new ``steps`` (lr jumps; not exact)
    allow_change: tuple[str, ...] = ()  # with resume: settings that may differ from the run's (not bit-exact)
    log: str | None = None  # also log to tensorboard / wandb (rankwise.loggers); metrics.jsonl is always written
    log_dir: str | None = None  # where the logger writes (default: out)

    def validate(self) -> None:
        """Types and ranges of every field; one ``RankwiseError`` naming the field and the fix."""
        for name in _INTS + _OPTIONAL_INTS:
            v = getattr(self, name)
            if not (_is_int(v) or (v is None and name in _OPTIONAL_INTS)):
                raise RankwiseError(f"{name} must be an integer, got {v!r}")
        for name in _FLOATS:
            v = getattr(self, name)
            if not _is_number(v):
                raise RankwiseError(f"{name} must be a finite number, got {v!r}")
        for name in _STRS + _OPTIONAL_STRS:
            v = getattr(self, name)
            if not (isinstance(v, str) or (v is None and name in _OPTIONAL_STRS)):
                raise RankwiseError(f"{name} must be a string, got {v!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise RankwiseError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.method_options, dict):
            raise RankwiseError(f"method_options must be a dict of option -> value, got {self.method_options!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "vocab_size"):
            if getattr(self, name) <= 0:
                raise RankwiseError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise RankwiseError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RankwiseError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RankwiseError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise RankwiseError(f"{name} must be >= 0, got {getattr(self, name)}")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise RankwiseError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if self.parallel not in distributed.MODES:
            raise RankwiseError(f"unknown parallel mode {self.parallel!r}; valid: {', '.join(distributed.MODES)}")
        if self.quantize is not None and self.quantize not in ("nf4", "int8"):
            raise RankwiseError(f"unknown quantize {self.quantize!r}; valid: nf4, int8")
        if self.quantize and self.parallel == "fsdp":
            raise RankwiseError("--quantize does not shard with --parallel fsdp yet (quantized tensors split unevenly "
                                "across ranks); use --parallel ddp")
        if self.dtype not in ("fp32", "bf16"):
            raise RankwiseError(f"unknown dtype {self.dtype!r}; valid: fp32, bf16")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise RankwiseError(f"unknown on_nonfinite {self.on_nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise RankwiseError(f"stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.schedule_steps is not None and self.schedule_steps <= 0:
            raise RankwiseError(f"schedule_steps must be a positive integer, got {self.schedule_steps}")
        if self.out is not None and not self.out.strip():
            raise RankwiseError("out '' is not a folder; give a folder path, or None to write nothing")
        if self.resume is not None and not self.resume.strip():
            raise RankwiseError("resume '' is not a folder; give the --out folder of an earlier run")
        if self.extend and not self.resume:
            raise RankwiseError("extend goes with resume: it stretches a resumed run's schedule to the new steps")
        if isinstance(self.allow_change, str) or not all(isinstance(a, str) for a in self.allow_change):
            raise RankwiseError(f"allow_change must be a list of setting names, got {self.allow_change!r}")
        names = {f.name for f in fields(self)}
        unknown = sorted(set(self.allow_change) - names)
        if unknown:
            raise RankwiseError(f"allow_change names unknown setting(s) {', '.join(unknown)}; valid: "
                                f"{', '.join(sorted(names - RESUME_FREE))}")
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
        if "allow_change" in d:
            d["allow_change"] = tuple(d["allow_change"])
        return cls(**d)

    @classmethod
    def of_run(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config saved in a run's checkpoint, with the per-invocation settings (``PER_CALL``) at defaults."""
        cfg, default = cls.from_dict(d), cls()
        for name in PER_CALL:
            setattr(cfg, name, getattr(default, name))
        return cfg

    @property
    def horizon(self) -> int:
        """The step at which the cosine schedule reaches ``min_lr_ratio``."""
        return self.schedule_steps or self.steps


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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast emulates it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def warn_slow_bf16(device: torch.device, dtype: str) -> None:
    """bf16 autocast on a CPU without native bf16 (e.g. AVX2 only) is ~8x slower than fp32 (measured on the
    ``mini`` model, 1 thread: 500 vs 4,000 tokens/s): say so once, with the fix."""
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning("bf16 autocast on this CPU (no AVX512-BF16 / AMX) is emulated, ~8x slower than fp32: "
                    "use --dtype fp32")


def lm_loss(model: nn.Module, batch: torch.Tensor | LabeledBatch) -> torch.Tensor:
    """Next-token cross-entropy of a (B, T+1) batch, computed in fp32; for a ``LabeledBatch`` (instruction data) the
    mean over its masked-in targets only (the prompt's targets are -100; 0 when a batch has none)."""
    ids = batch.ids if isinstance(batch, LabeledBatch) else batch
    logits = getattr(model(input_ids=ids[:, :-1]), "logits", None)
    if logits is None:
        raise RankwiseError(f"the model ({type(model).__name__}) returned no .logits: it must be a causal LM "
                            "such as a transformers AutoModelForCausalLM")
    logits = logits.float().reshape(-1, logits.size(-1))
    if not isinstance(batch, LabeledBatch):
        return F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    labels = ids[:, 1:].masked_fill(~batch.mask, -100).reshape(-1)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / batch.mask.sum().clamp(min=1)


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` past float range (a loss above ~709) instead of an ``OverflowError``."""
    return math.exp(loss) if loss < 709.0 else math.inf


def check_causal_lm(model: Any) -> None:
    """``model`` must be a module whose forward takes ``input_ids`` (and returns ``.logits``)."""
    kind = type(model).__name__
    if not isinstance(model, nn.Module):
        raise RankwiseError(f"model must be a causal LM (a torch nn.Module such as a transformers "
                            f"AutoModelForCausalLM), got a {kind}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if "input_ids" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RankwiseError(f"model must be a causal LM whose forward takes input_ids and returns .logits (such as "
                            f"a transformers AutoModelForCausalLM), got {kind}")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device, dtype: str = "fp32") -> float:
    """Mean next-token loss over ``batches`` (each weighted by its target count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast(device, dtype):
        for batch in batches:
            batch = batch.to(device)
            n = target_count(batch)
            total += lm_loss(model, batch).item() * n
            count += n
    model.train(was_training)
    distributed.reshard_model(model)
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

    def __init__(self, out: str | None, resumed_step: int, clear: bool = False, keep_sharded: str | None = None):
        self.dir = Path(out) if out else None
        self._jsonl = None
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if clear:  # --overwrite: the earlier run's files go, so nothing of it can mix with this one
            paths.clear_run(self.dir)
        removed = clean_stale(self.dir)
        for old in self.dir.glob(f"{distributed.SHARDED_DIR}-*"):  # FSDP folders the checkpoint does not name
            if old.is_dir() and old.name != keep_sharded:
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old.name)
        if removed:
            log.info("removed %d stale temp file(s) from %s", len(removed), self.dir)
        path = self.dir / "metrics.jsonl"
        kept = []
        if resumed_step and path.exists():  # drop records past the checkpoint we resume from
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
                    kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        self._jsonl = path.open("a")

    def record(self, row: dict[str, Any]) -> None:
        if self._jsonl:
            with explained_errors(self.dir / "metrics.jsonl"):  # a full disk: one line, not a traceback
                self._jsonl.write(json_dumps(row) + "\n")
                self._jsonl.flush()

    def write_json(self, name: str, obj: Any) -> None:
        if self.dir:
            write_json_atomic(self.dir / name, obj, indent=2)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None


class _SigintGuard:
    """Defers Ctrl-C (SIGINT) while the run's state changes (optimizer step .. after_step, metrics line, checkpoint
    write): the interrupt is raised as ``KeyboardInterrupt`` right after that section, when model, optimizer,
    scheduler and method agree on one step. Installed only in the main thread over Python's default handler."""

    def __init__(self) -> None:
        self.depth, self.pending, self._old = 0, False, None

    def __enter__(self) -> "_SigintGuard":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def enter(self) -> None:
        self.depth += 1

    def exit(self) -> None:
        """Leave a section; raise the interrupt that arrived inside it, if any."""
        self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        self.enter()
        try:
            yield
        except BaseException:
            self.depth -= 1
            raise
        self.exit()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite(named: Any) -> str | None:
    """The name of the first floating-point tensor in ``named`` ((name, tensor) pairs) holding a NaN or inf.
    Quantized tensor subclasses (a frozen NF4 / int8 base: never updated) are not inspected."""
    for name, t in named:
        plain = type(t) in (torch.Tensor, nn.Parameter) or type(t).__name__ == "DTensor"
        if plain and t.is_floating_point() and not bool(torch.isfinite(_local(t)).all()):
            return name
    return None


def _nonfinite_grad(model: nn.Module) -> str | None:
    return first_nonfinite((n, p.grad) for n, p in model.named_parameters())


def _check_resume(cfg: TrainConfig, state: dict[str, Any]) -> TrainConfig:
    """Refuse settings that change the computation of a resumed run (unless in ``allow_change``); return ``cfg``
    with the schedule horizon of the run (or, with ``extend``, the new ``steps``)."""
    try:
        run = TrainConfig.from_dict(state["config"])
    except TypeError as e:
        raise RankwiseError(f"the checkpoint in {cfg.resume!r} holds an unreadable config ({e})") from None
    for f in fields(TrainConfig):
        if f.name in RESUME_FREE or f.name in cfg.allow_change:
            continue
        old, new = getattr(run, f.name), getattr(cfg, f.name)
        if f.name == "betas":
            old, new = tuple(old), tuple(new)
        if old != new:
            flag = "--opt / --rank / ..." if f.name == "method_options" else "--" + f.name.replace("_", "-")
            raise RankwiseError(f"resume {cfg.resume!r}: the run used {f.name}={old!r}, this call sets {new!r}, "
                                f"which changes the computation; drop {flag}, or pass --allow-change {f.name} to "
                                "continue with the new value (not bit-exact)")
    horizon = cfg.steps if cfg.extend else run.horizon
    if cfg.schedule_steps is not None and cfg.schedule_steps != horizon and "schedule_steps" not in cfg.allow_change:
        raise RankwiseError(f"resume {cfg.resume!r}: the run's schedule ends at step {horizon}, this call sets "
                            f"schedule_steps={cfg.schedule_steps}; drop it, or pass extend=True (--extend)")
    return replace(cfg, schedule_steps=cfg.schedule_steps or horizon)


def _apply_allowed_changes(run: TrainConfig, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Loading the optimizer restored the run's lr / betas / weight decay: apply the ones ``allow_change`` let
    differ (the lr scales every group's base lr, keeping per-group multipliers)."""
    if cfg.lr != run.lr:
        factor = cfg.lr / run.lr
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["initial_lr"] = group.get("initial_lr", run.lr) * factor
    for group in optimizer.param_groups:
        if tuple(cfg.betas) != tuple(run.betas) and "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if (cfg.weight_decay != run.weight_decay and group.get("weight_decay") == run.weight_decay
                and all(p.dim() >= 2 for p in group["params"])):  # matrices decay, vectors never (decay_groups)
            group["weight_decay"] = cfg.weight_decay


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
    """Train ``model`` (default: the preset, randomly initialised) with ``method`` (default: ``cfg.method``).

    Interrupts (Ctrl-C) and non-finite losses leave ``OUT/checkpoint.pt`` consistent: it holds either the state
    after the last completed step or the previous checkpoint, never a mix. A non-finite loss / gradient norm stops
    the run with a ``NonFiniteError`` naming the step and the tensor (``on_nonfinite="skip"``: the step's update is
    skipped and training goes on)."""
    cfg.validate()
    check_logger(cfg.log)
    if cfg.log and not (cfg.log_dir or cfg.out):
        raise RankwiseError(f"--log {cfg.log} writes into the run folder: give --out (or log_dir)")
    paths.check_out_dir(cfg.out)
    resuming_here = bool(cfg.resume and cfg.out and Path(cfg.out).resolve() == Path(cfg.resume).resolve())
    if not resuming_here:  # every rank checks before any of them writes (setup is a rendezvous)
        paths.check_new_run(cfg.out, cfg.overwrite)
    if model is None and cfg.preset not in PRESETS and not os.path.isdir(cfg.preset):
        build_model(cfg.preset)  # raises the unknown-preset error before anything is written
    if model is not None:
        check_causal_lm(model)
    method = method or methods_mod.get(cfg.method, **cfg.method_options)
    state = ckpt.load(cfg.resume) if cfg.resume else None
    if state is not None:
        cfg = _check_resume(cfg, state)
        if state["step"] >= cfg.steps:
            raise RankwiseError(f"the checkpoint in {cfg.resume!r} is already at step {state['step']} of "
                                f"{cfg.steps}; raise --steps to train further")
        if cfg.stop_at is not None and cfg.stop_at <= state["step"]:
            raise RankwiseError(f"stop_at {cfg.stop_at} is not after the checkpoint's step {state['step']}")
    device = resolve_device(cfg.device)
    par = distributed.setup(cfg.parallel, cfg.batch_size, device)  # one process, DDP or FSDP: the loop calls it alike
    device = par.device
    par.check(method)
    warn_slow_bf16(device, cfg.dtype)
    corpus = corpus or prepare(cfg.data, cfg.vocab_size, tokenizer=_tokenizer_for(cfg))
    train_data = corpus.batches("train", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.pack)
    eval_data = corpus.batches("val", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.pack).eval_batches(cfg.eval_batches)

    model = _build_model(cfg, model, method, corpus.vocab_size, train_data, device)
    model.train()
    engine = par.wrap(model)  # what forward/backward run through (the model, DDP around it, or it sharded in place)
    optimizer = method.build_optimizer(model, OptimConfig(cfg.lr, cfg.weight_decay, cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.horizon, cfg.min_lr_ratio) * method.lr_factor(s))
    trainable, total = count_params(model)
    layerwise = bool(getattr(optimizer, "layerwise", False))  # updates run inside backward

    start, initial_eval, train_time, tokens_done, pending = 0, None, 0.0, 0, None
    if state is not None:
        try:
            par.load(model, optimizer, state, cfg.resume)
            scheduler.load_state_dict(state["scheduler"])
            method.load_state_dict(state["method"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            if isinstance(e, RankwiseError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankwiseError(f"the checkpoint in {cfg.resume!r} does not fit this model / method "
                                f"({type(e).__name__}: {first[:200]}); resume with the run's own --method and "
                                "--preset") from None
        _apply_allowed_changes(TrainConfig.from_dict(state["config"]), cfg, optimizer, scheduler)
        # the lr of the resumed step from this run's schedule (the same floats LambdaLR computed, unless --extend
        # changed the horizon); torch.distributed.checkpoint restores tensors, not the groups' floats
        scheduler._last_lr = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs,
                                                                                   scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
            group["lr"] = lr
        ckpt.set_rng_state(state["rng"])
        start, initial_eval = state["step"], state["initial_eval_loss"]
        train_time, tokens_done = state["train_time"], state["tokens"]
        pending = state.get("pending_row")  # the row of the checkpoint's step, if its eval/record was interrupted
    out = _Output(cfg.out if par.main else None, start, clear=cfg.overwrite and state is None,
                  keep_sharded=state.get("sharded") if state is not None and resuming_here else None)
    if state is not None and not resuming_here and par.main:
        clean_stale(cfg.resume)  # debris of the earlier run's killed writes
    out.write_json(TRAIN_CONFIG, _describe(cfg, method))
    if out.dir:
        corpus.save_tokenizer(out.dir)
    guard = _SigintGuard()
    logger = (MetricLogger(cfg.log, cfg.log_dir or cfg.out, asdict(cfg))
              if cfg.log and par.main else None)
    if initial_eval is None:
        initial_eval = evaluate(model, eval_data, device, cfg.dtype)
        if not math.isfinite(initial_eval):
            out.close()
            if logger is not None:
                logger.close()
            raise NonFiniteError(f"the initial eval loss is {initial_eval}: the model's weights are non-finite "
                                 f"({first_nonfinite(model.named_parameters()) or 'no parameter'} holds NaN/inf)")
        out.record({"step": 0, "eval_loss": initial_eval, "eval_ppl": perplexity(initial_eval)})
        if logger is not None:
            logger.log({"step": 0, "eval_loss": initial_eval, "eval_ppl": perplexity(initial_eval)})

    saved = start  # the step of the checkpoint on disk (0: none yet, or the one resumed from)
    writes = bool(cfg.out)  # this run writes checkpoints (every rank takes part)
    skipped: list[int] = []

    def save(step: int, rng: dict[str, Any] | None = None, pending_row: dict[str, Any] | None = None) -> None:
        """Checkpoint the state after ``step`` (``rng``: the RNG state of that point, default now)."""
        nonlocal saved
        if not writes:
            return
        bad = first_nonfinite(model.state_dict().items())
        if par.any(bad is not None):  # every rank decides alike
            bad = bad or "a weight shard of another rank"
        if bad is not None:
            raise NonFiniteError(f"not saving step {step}: {bad} holds NaN/inf (the checkpoint of step {saved} "
                                 "is kept)")
        payload = {"scheduler": scheduler.state_dict(), "method": method.state_dict(),
                   "rng": rng if rng is not None else ckpt.rng_state(), "step": step,
                   "initial_eval_loss": initial_eval, "train_time": train_time, "tokens": tokens_done,
                   "config": asdict(cfg), "pending_row": pending_row}
        with guard.critical():
            par.save(model, optimizer, payload, Path(cfg.out), step)
            saved = step

    history: list[dict[str, Any]] = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    last = cfg.stop_at or cfg.steps
    params = [p for p in model.parameters() if p.requires_grad]
    bar, show = _progress(cfg, start)
    eval_loss = initial_eval
    # (committed, rng): the step that model, optimizer, scheduler and method all agree on (None while an update is
    # half applied) and the RNG state a checkpoint of it must hold; pending: that step's row, not yet recorded
    committed, rng = start, ckpt.rng_state()

    def finish(row: dict[str, Any]) -> None:
        """Evaluate (when due) and record the row of the committed step."""
        nonlocal eval_loss, pending
        step = row["step"]
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == last:
            eval_loss = evaluate(model, eval_data, device, cfg.dtype)
            if not math.isfinite(eval_loss):
                raise NonFiniteError(f"step {step}: the eval loss is {eval_loss} "
                                     f"({first_nonfinite(model.named_parameters()) or 'no parameter'} holds NaN/inf)")
            row = {**row, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)}
        with guard.critical():
            history.append(row)
            out.record(row)
            pending = None
        if logger is not None:
            logger.log(row)
        if on_step:
            on_step(row)
        show(step, f"loss {row['loss']:.3f}  {tokens_done / train_time:,.0f} tok/s" if row["loss"] is not None
             else "skipped")
        if cfg.quiet and (step % 10 == 0 or step == last):
            log.info("step %d/%d loss %s lr %.2e %.0f tok/s", step, cfg.steps,
                     "skipped" if row["loss"] is None else f"{row['loss']:.4f}", row["lr"], row["tokens_per_s"])

    with PeakMemory(device) as peak, bar, guard:
        try:
            if pending is not None:
                finish(pending)
            for step in range(start + 1, last + 1):
                rng = ckpt.rng_state()  # what a checkpoint of step - 1 holds
                t0 = time.perf_counter()
                loss_sum, bad = 0.0, None
                for micro in range(cfg.grad_accum):
                    batch = train_data.train_batch((step - 1) * cfg.grad_accum + micro)
                    batch = par.shard_batch(batch).to(device)
                    with autocast(device, cfg.dtype):
                        loss = lm_loss(engine, batch)
                        aux = method.aux_loss(model)
                    total_loss = loss if aux is None else loss + aux
                    if layerwise:  # the hooks update the weights during backward: check first, then commit
                        if not math.isfinite(par.mean(total_loss.item())):
                            bad, loss_sum = "loss", loss_sum + loss.item()
                            break
                        if committed is not None:
                            committed = None
                            guard.enter()
                        optimizer.accumulating = micro < cfg.grad_accum - 1  # update on the last micro-batch only
                    (total_loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                loss_sum = par.mean(loss_sum)
                grad_norm = None
                if bad is None and any(p.grad is not None for p in params):
                    # = clip_grad_norm_, split so that a non-finite norm is seen before it spreads to every grad
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    grad_norm = par.scalar(norm)
                if bad is None and not math.isfinite(loss_sum):
                    bad = "loss"
                if bad is None and grad_norm is not None and not math.isfinite(grad_norm):
                    bad = "grad_norm"
                if bad is None and grad_norm is not None and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
                if bad is not None:
                    if layerwise and committed is None:
                        raise NonFiniteError(f"step {step}: non-finite {bad} after a layer-wise update")
                    skip = _nonfinite(cfg, model, step, bad, loss_sum, grad_norm)
                    optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                if committed is not None:
                    committed = None  # from here on the step is half applied until it completes
                    guard.enter()
                if bad is None:
                    optimizer.step()
                    par.after_step(optimizer)
                else:
                    skipped.append(step)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step(step, model, optimizer)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                train_time += dt
                tokens_done += tokens_per_step
                row = {"step": step, "loss": loss_sum / cfg.grad_accum if bad is None else None, "lr": lr,
                       "tokens_per_s": tokens_per_step / dt}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if aux is not None:
                    row["aux_loss"] = aux.item()
                if bad is not None:
                    row["skipped"] = skip
                committed, rng, pending = step, ckpt.rng_state(), row
                guard.exit()  # a Ctrl-C during the update is raised here, with the state consistent at `step`
                finish(row)
                rng = None  # from here a checkpoint of `step` holds the RNG state of the moment it is written
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != last:
                    save(step)
            save(committed)
        except (KeyboardInterrupt, NonFiniteError) as e:
            guard.depth, guard.pending = 0, False
            kept = ""
            if committed is not None and (committed > saved or pending is not None):
                try:  # the state after the last completed step, consistent whatever was interrupted
                    save(committed, rng, pending)
                except NonFiniteError as bad_weights:
                    kept = f"; {bad_weights}"
            out.close()
            if isinstance(e, NonFiniteError):
                where = ("" if not writes else f"; the checkpoint of step {saved} is kept" if saved else
                         "; no checkpoint was written")
                raise NonFiniteError(f"{e}{kept}{where}") from None
            raise
        finally:
            out.close()
            if logger is not None and sys.exc_info()[0] is not None:
                logger.close()
    step = committed
    metrics = {
        "method": method.name, "preset": cfg.preset, "steps": step,
        "initial_eval_loss": initial_eval, "final_eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss),
        "final_train_loss": history[-1]["loss"] if history else None,
        "tokens": tokens_done, "tokens_per_s": tokens_done / train_time if train_time else None,
        "peak_mem_bytes": peak.peak, "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta",
        "optimizer_state_bytes": par.state_bytes(optimizer),
        "trainable_params": trainable, "total_params": total,
        "config": _describe(cfg, method),
    }
    if skipped:
        metrics["skipped_steps"] = skipped
    if history and eval_loss >= initial_eval:
        log.warning("the eval loss did not go down (%.4f -> %.4f): check --lr (%g; too high flattens the loss at "
                    "ln(vocab)) and --warmup-steps", initial_eval, eval_loss, cfg.lr)
    metrics.update(par.describe())
    out.write_json("metrics.json", metrics)
    if logger is not None:
        logger.finish(metrics)
        logger.close()
    if out.dir:
        from .export import save_run_adapter

        save_run_adapter(model, out.dir, cfg.model or cfg.preset)
    if out.dir:
        from .plots import loss_curve

        loss_curve(out.dir / "metrics.jsonl", out.dir / "loss_curve.png", title=f"{method.name} on {cfg.preset}")
    return RunResult(metrics, model, optimizer, method, history)


def _nonfinite(cfg: TrainConfig, model: nn.Module, step: int, what: str, loss: float,
               grad_norm: float | None) -> str:
    """Stop (raise ``NonFiniteError``), or say what is skipped, on a non-finite loss / gradient norm."""
    tensor = _nonfinite_grad(model)
    detail = (f"step {step}: non-finite {what} (loss {loss}, grad norm {grad_norm}); "
              + (f"first non-finite gradient: {tensor}" if tensor else "every gradient is finite"))
    weights = first_nonfinite(model.named_parameters())
    if weights is not None:
        raise NonFiniteError(f"{detail}; the weights are already non-finite ({weights}), so skipping cannot help")
    if cfg.on_nonfinite == "stop":
        raise NonFiniteError(f"{detail}; lower --lr or raise --warmup-steps, or pass --on-nonfinite skip to skip "
                             "such steps")
    log.warning("%s; step skipped (--on-nonfinite skip)", detail)
    return f"non-finite {what}" + (f" ({tensor})" if tensor else "")


def _build_model(cfg: TrainConfig, model: nn.Module | None, method: Method, vocab_size: int,
                 train_data: Batches | None, device: torch.device) -> nn.Module:
    """The given model, else ``cfg.model``'s pretrained weights, else the preset (random init, ``vocab_size``
    tokens), checked against the data, calibrated on ``train_data`` and prepared by the method."""
    torch.manual_seed(cfg.seed)
    method.set_total_steps(cfg.horizon)
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


def load_run(run_dir: str, device: str | torch.device = "cpu", state: dict[str, Any] | None = None) -> LoadedRun:
    """The model saved in ``run_dir`` (by ``train`` with ``out=run_dir``), rebuilt with its method, and its
    tokenizer. Methods that calibrate on data before ``prepare`` (LoRA-GA, ...) get the run's own training data.
    ``state``: the run's checkpoint if the caller has already read it (read from ``run_dir`` otherwise)."""
    state = ckpt.load(run_dir) if state is None else state
    cfg = TrainConfig.from_dict(state["config"])
    dev = resolve_device(device) if isinstance(device, str) else device
    method = methods_mod.get(cfg.method, **cfg.method_options)
    tokenizer = run_tokenizer(run_dir)
    corpus = prepare(cfg.data, tokenizer=tokenizer) if method.calibration_batches else None
    train_data = corpus.batches("train", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.pack) if corpus else None
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
    batches = corpus.batches("val", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.pack).eval_batches(cfg.eval_batches)
    loss = evaluate(run.model, batches, next(run.model.parameters()).device, cfg.dtype)
    return {"method": cfg.method, "data": cfg.data, "step": run.state["step"], "eval_loss": loss,
            "eval_ppl": perplexity(loss), "seq_len": cfg.seq_len, "tokens": sum(target_count(b) for b in batches)}


def _describe(cfg: TrainConfig, method: Method) -> dict[str, Any]:
    return {**asdict(cfg), "method_options": method.describe(), "torch": torch.__version__,
            "python": platform.python_version()}
