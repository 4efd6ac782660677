"""``run_bench``: every method on the same model, data order, tokens and schedule, for N seeds, optionally at matched
memory and at tuned learning rates; one fresh process per run; resumable.

    from rankwise.bench import BenchConfig, run_bench
    rows = run_bench(BenchConfig(preset="tiny", methods=["full", "lowrank-rr"], steps=20, seeds=2, out="bench-out"))

Everything is validated before the first run (methods, options and their types, ranks on the model, sequence length,
seeds, budgets, the lr grid, the output folder). ``OUT/bench_config.json`` records the configuration; a rerun into
the same ``OUT`` skips every finished run (``runs/.../result.json`` whose ``job.json`` matches) and redoes the
others, and refuses an ``OUT`` made with another configuration. Workers die with the bench (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import methods
from ..atomic import write_json_atomic
from ..errors import RankwiseError
from ..progress import Progress
from ..train import TrainConfig
from .budget import MIB, Match, match_rank, parse_budget, planned_bytes, train_memory
from .presets import BenchPreset, MethodSpec, get, parse_method
from .tune import lr_grid, rung_steps, successive_halving
from .worker import run_job

TUNED_LRS = Path(__file__).with_name("tuned_lrs.json")


@dataclass
class BenchConfig:
    preset: str = "tiny"
    methods: list[str] | None = None  # default: the preset's methods
    steps: int | None = None  # default: the preset's; warmup keeps its fraction of the schedule
    rank: int | None = None  # overrides the rank of every method that has one
    budget: str | None = None  # e.g. "24GB": only methods whose planned memory (with activations) fits
    match_memory: list[str] | None = None  # e.g. ["60MiB"], ["100%", "75%"] (of full-rank's w+g+optim), ["preset"]
    memory_tolerance: float = 0.05
    seeds: int | None = None  # runs per method; default: the preset's
    seed: int = 0  # first seed; the runs use seed, seed + 1, ...
    tune: bool = False  # tune every method's lr first (successive halving), then run at the tuned lrs
    tune_only: bool = False
    tune_points: int | None = None
    tune_span: float | None = None
    tune_seeds: int = 1
    tuned: str | None = None  # a tuned.json to take lrs from (default: the shipped tuned_lrs.json)
    out: str = "bench-out"
    device: str = "auto"
    isolate: bool = True  # one fresh process per run (honest peak memory); False: in this process
    jobs: int | None = None  # runs at a time (each its own process); default: cores // threads on CPU, 1 on GPU
    threads: int = 1  # intra-op threads of each run (they change the numbers' rounding, so they are configuration)
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (batch_size, seq_len, lr, dtype...)


@dataclass(frozen=True)
class Entry:
    label: str  # as given in --methods, e.g. "galore:rank=32"
    name: str  # the preset's key (before ":"), which the tuned lrs are stored under
    spec: MethodSpec


@dataclass(frozen=True)
class Job:
    """One training run: ``group`` (label @ budget) x seed."""

    label: str
    group: str
    budget: str | None
    seed: int
    run_dir: Path
    config: dict[str, Any]
    threads: int = 1

    def payload(self) -> dict[str, Any]:
        return {"label": self.label, "group": self.group, "budget": self.budget, "seed": self.seed,
                "config": self.config, "run_dir": str(self.run_dir), "threads": self.threads}


def _plain(config: TrainConfig) -> dict[str, Any]:
    """A config as JSON would give it back (tuples as lists), so a rerun compares it with ``job.json`` exactly."""
    return json.loads(json.dumps(asdict(config)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ---------------------------------------------------------------------------------------------------- validation


def _check_option_types(label: str, method: str, options: dict[str, Any]) -> None:
    """Each option has its default's type (``rank=abc`` is caught here, not minutes later in a worker)."""
    defaults = methods.info(method).options()
    for key, value in options.items():
        if key not in defaults:
            continue  # methods.get names the unknown option
        d = defaults[key]
        if d is None:
            continue
        if isinstance(d, bool):
            ok = isinstance(value, bool)
        elif isinstance(d, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(d, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, type(d))
        if not ok:
            kind = {"bool": "true or false", "int": "an integer", "float": "a finite number"}.get(
                type(d).__name__, f"a {type(d).__name__}")
            raise RankwiseError(f"option {key}={value!r} of {label!r} must be {kind} (default "
                                f"{json.dumps(d)}); e.g. {method}:{key}={json.dumps(d)}")
    if "rank" in options and not options["rank"] > 0:
        raise RankwiseError(f"rank must be a positive integer, got {options['rank']} in {label!r}")


def _positions(model: str, vocab_size: int) -> int | None:
    from ..plan import _config

    return getattr(_config(model, vocab_size), "max_position_embeddings", None)


def _check_out(out: str) -> Path:
    if not out or not str(out).strip():
        raise RankwiseError("--out must name a folder, got an empty path")
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise RankwiseError(f"--out {out!r}: {str(p)!r} is a file, not a folder; choose another --out")
    return path


def resolve(cfg: BenchConfig) -> tuple[BenchPreset, list[Entry]]:
    """The preset (with ``steps`` and overrides applied) and the validated method entries."""
    preset = get(cfg.preset)
    if cfg.steps is not None:
        if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps <= 0:
            raise RankwiseError(f"steps must be a positive integer, got {cfg.steps}")
        warmup = round(preset.warmup_steps * cfg.steps / preset.steps)
        preset = replace(preset, steps=cfg.steps, warmup_steps=warmup, eval_every=min(preset.eval_every, cfg.steps))
    if cfg.rank is not None and (isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank <= 0):
        raise RankwiseError(f"--rank must be a positive integer, got {cfg.rank}")
    specs = cfg.methods or preset.defaults()
    if not specs:
        raise RankwiseError("no method to run; name some with --methods (see `rankwise methods`)")
    entries = []
    for text in specs:
        label, spec = parse_method(text, preset)
        info = methods.info(spec.method)  # raises the unknown-method error, listing the valid ones
        if cfg.rank is not None and "rank" in info.options():
            spec = replace(spec, options={**spec.options, "rank": cfg.rank})
        _check_option_types(label, spec.method, spec.options)
        methods.get(spec.method, **spec.options)  # unknown options, and the method's own checks
        entries.append(Entry(label, label.partition(":")[0], spec))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise RankwiseError(f"--methods names a method twice: {', '.join(labels)}")
    return preset, entries


def _check_protocol(cfg: BenchConfig, preset: BenchPreset) -> None:
    seeds = preset.seeds if cfg.seeds is None else cfg.seeds
    for name, value in (("--seeds", seeds), ("--tune-seeds", cfg.tune_seeds), ("--jobs", jobs_of(cfg)),
                        ("--threads", cfg.threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RankwiseError(f"{name} must be a positive integer, got {value!r}")
    if not 0 < cfg.memory_tolerance < 1:
        raise RankwiseError(f"memory tolerance must be in (0, 1), got {cfg.memory_tolerance}")
    if cfg.tune or cfg.tune_only:
        lr_grid(1.0, preset.tune_points if cfg.tune_points is None else cfg.tune_points,
                preset.tune_span if cfg.tune_span is None else cfg.tune_span)
        rung_steps(preset.steps, preset.tune_rungs)
    if cfg.budget and cfg.match_memory:
        raise RankwiseError("--budget and --match-memory both choose methods by memory; give one of them")


# ---------------------------------------------------------------------------------------------------- lrs


def load_tuned(preset: str, path: str | None) -> tuple[dict[str, Any], str]:
    """Tuned lrs ``{name: {"method", "lr", ...}}`` for ``preset`` from ``path`` (a tuned.json) or the shipped file."""
    src = Path(path) if path else TUNED_LRS
    try:
        data = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RankwiseError(f"cannot read tuned lrs from {str(src)!r}: {e}") from None
    if path:  # a tuned.json written by --tune
        if data.get("preset") != preset:
            raise RankwiseError(f"{path!r} holds lrs tuned for preset {data.get('preset')!r}, not {preset!r}")
        return data.get("methods", {}), str(src)
    return (data.get("presets", {}).get(preset) or {}).get("methods", {}), "shipped tuned_lrs.json"


def entry_lr(preset: BenchPreset, e: Entry, cfg: BenchConfig, tuned: dict[str, Any],
             this_run: bool = False) -> tuple[float, str]:
    """The entry's lr and where it came from: tuned (x ``lr_scale``), or ``--lr`` / the preset's default.

    Tuned lrs are looked up by label, then by the preset's name; ``--lr`` overrides shipped tuned lrs but not the ones
    this run tuned (``this_run``: their grid was centred on ``--lr``)."""
    base = cfg.overrides.get("lr")
    if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf):
        raise RankwiseError(f"--lr must be a positive finite number, got {base!r}")
    t = tuned.get(e.label, tuned.get(e.name))
    if (base is None or this_run) and t is not None and t.get("method") == e.spec.method:
        lr, source = float(t["lr"]), "tuned (this run)" if this_run else "tuned"
    else:
        lr = (preset.lr if base is None else base) * e.spec.lr_mult
        source = "--lr" if base is not None else "preset default (not tuned)"
    if e.spec.lr_scale != 1.0:
        lr, source = lr * e.spec.lr_scale, f"{source} x {e.spec.lr_scale:g}"
    return lr, source


def train_config(preset: BenchPreset, entry: Entry, cfg: BenchConfig, lr: float | None = None, seed: int | None = None,
                 options: dict[str, Any] | None = None, steps: int | None = None) -> TrainConfig:
    steps = steps or preset.steps
    base = TrainConfig(preset=preset.model, method=entry.spec.method,
                       method_options=dict(entry.spec.options if options is None else options),
                       data=preset.data, vocab_size=preset.vocab_size, steps=steps,
                       batch_size=preset.batch_size, grad_accum=preset.grad_accum, seq_len=preset.seq_len,
                       lr=preset.lr, warmup_steps=round(preset.warmup_steps * steps / preset.steps),
                       dtype=preset.dtype, seed=cfg.seed if seed is None else seed,
                       eval_every=min(preset.eval_every, steps), eval_batches=preset.eval_batches,
                       checkpoint_every=0, out=None, device=cfg.device, quiet=True)
    unknown = sorted(set(cfg.overrides) - set(asdict(base)))
    if unknown:
        raise RankwiseError(f"unknown training setting(s) {', '.join(unknown)}")
    for key, value in cfg.overrides.items():
        if value is not None and key != "lr":
            setattr(base, key, value)
    base.lr = entry_lr(preset, entry, cfg, {})[0] if lr is None else lr
    base.validate()
    positions = _positions(base.preset, base.vocab_size)
    if positions is not None and base.seq_len > positions:
        raise RankwiseError(f"seq_len {base.seq_len} is longer than the {positions} positions of model "
                            f"{base.preset!r}; "
                            f"use --seq-len {positions} or less")
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


# ---------------------------------------------------------------------------------------------------- memory match


def match_budgets(preset: BenchPreset, entries: list[Entry], budgets: list[str], tolerance: float
                  ) -> tuple[dict[tuple[str, str], Match], int]:
    """Every (entry, budget) matched by rank (``budget.match_rank``); and full-rank AdamW's training memory, which
    ``"80%"`` budgets refer to."""
    full = train_memory(preset.model, "full", {}, preset.dtype, preset.vocab_size)
    matches = {}
    for b in budgets:
        kind, value = parse_budget(b)
        target = int(value * full) if kind == "fraction" else int(value)
        for e in entries:
            matches[(e.label, b)] = match_rank(preset.model, e.spec.method, e.spec.options, target, preset.dtype,
                                               preset.vocab_size, tolerance)
    if not any(m.ok for m in matches.values()):
        near = min(matches.values(), key=lambda m: abs(m.bytes / m.target - 1))
        raise RankwiseError(f"no method can reach --match-memory {','.join(budgets)} within {tolerance:.0%} "
                            f"(full-rank AdamW needs {full / MIB:.1f} MiB; the closest plan is {near.bytes / MIB:.1f} "
                            f"MiB for {near.target / MIB:.1f} MiB); choose budgets near that, e.g. 80%")
    return matches, full


# ---------------------------------------------------------------------------------------------------- execution


def jobs_of(cfg: BenchConfig) -> int:
    """Runs at a time: ``cfg.jobs``, or by default every core busy on CPU (cores // threads) and one run on a GPU."""
    if cfg.jobs is not None:
        return cfg.jobs
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    threads = cfg.threads if isinstance(cfg.threads, int) and cfg.threads > 0 else 1
    return 1 if on_gpu or not cfg.isolate else max(1, (os.cpu_count() or 1) // threads)


def _fingerprint(cfg: BenchConfig, preset: BenchPreset, entries: list[Entry], extra: dict[str, Any]) -> dict:
    """Everything that changes the numbers (not ``jobs``/``isolate``, which only change how they are computed;
    ``threads`` does change them: a matmul's summation order depends on the thread count)."""
    return json.loads(json.dumps({
        "preset": cfg.preset, "setup": {k: v for k, v in asdict(preset).items() if k != "methods"},
        "methods": {e.label: asdict(e.spec) for e in entries}, "overrides": cfg.overrides, "device": cfg.device,
        "seed": cfg.seed, "threads": cfg.threads, **extra}, default=str))


def _claim_out(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse an ``OUT`` holding another configuration's results (nothing is touched); record ours."""
    path = out / "bench_config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old != fingerprint:
            keys = sorted(k for k in {*old, *fingerprint} if old.get(k) != fingerprint.get(k))
            raise RankwiseError(f"--out {str(out)!r} holds a bench made with another configuration (differs in: "
                                f"{', '.join(keys)}); rerun with its settings to resume it, or choose a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise RankwiseError(f"--out {str(out)!r} is not empty and holds no bench_config.json (not a bench made by "
                            "this version); choose a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "bench_config.json", fingerprint, indent=1)
    except OSError as e:
        raise RankwiseError(f"cannot write to --out {str(out)!r}: {e.strerror or e}; choose a writable "
                            "folder") from None


def finished(job: Job) -> dict[str, Any] | None:
    """The recorded result of ``job`` if it finished with this exact configuration."""
    try:
        done = json.loads((job.run_dir / "job.json").read_text())
        result = json.loads((job.run_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if done.get("config") == job.config and result.get("status") == "ok" else None


def _failed(job: Job, why: str) -> dict[str, Any]:
    return {"label": job.label, "group": job.group, "budget": job.budget, "seed": job.seed,
            "method": job.config["method"], "status": f"failed: {why[:200]}"}


def _start(job: Job, env: dict[str, str]) -> subprocess.Popen:
    if job.run_dir.exists():  # an unfinished run: start it again from scratch
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "job.json").write_text(json.dumps(job.payload(), indent=1))
    log = (job.run_dir / "log.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "rankwise.bench", str(job.run_dir / "job.json"),
                             "--parent", str(os.getpid())], stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    (job.run_dir / "worker.pid").write_text(str(proc.pid))
    return proc


def _collect(job: Job, returncode: int) -> dict[str, Any]:
    result = finished(job)
    if returncode == 0 and result is not None:
        return result
    lines = (job.run_dir / "log.txt").read_text(errors="replace").strip().splitlines()
    return _failed(job, lines[-1] if lines else f"exit {returncode}, no output")


def execute(jobs: list[Job], cfg: BenchConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every unfinished job (``cfg.jobs`` at a time); return the results in ``jobs`` order."""
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, job in enumerate(jobs):
        done = finished(job)
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    if len(todo) < len(jobs):
        log(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} runs already finished in {cfg.out}, "
            f"{len(todo)} to run")
    # each run's line carries the job's elapsed time and ETA; on a terminal a rich bar shows them too
    progress = Progress("bench", len(jobs), len(jobs) - len(todo), 1 if not cfg.isolate else jobs_of(cfg), "runs",
                        bar=log is print and sys.stdout.isatty(), plain=False, stream=sys.stdout)
    try:
        rows = _execute(jobs, todo, results, cfg, log, progress)
    finally:
        progress.close()
    own = jobs_of(cfg) * cfg.threads if cfg.isolate else torch.get_num_threads()
    for row in rows:  # the load the bench itself puts on the machine (``report.loaded`` discounts it)
        row.setdefault("bench_threads", own)
    return rows


def _execute(jobs: list[Job], todo: list[int], results: dict[int, dict[str, Any]], cfg: BenchConfig,
             log: Callable[[str], None], progress: Progress) -> list[dict[str, Any]]:
    def report(i: int, row: dict[str, Any], wall: float) -> None:
        row.setdefault("wall_s", wall)
        results[i] = row
        job = jobs[i]
        head = f"[{len(results)}/{len(jobs)}] {job.group} seed {job.seed}"
        tail = progress.finish(wall)
        if row["status"] == "ok":
            log(f"{head}: eval ppl {row['eval_ppl']:.2f} ({row['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s); {tail}")
        else:
            log(f"{head}: {row['status']} (log: {job.run_dir / 'log.txt'}); {tail}")

    if not cfg.isolate:
        for i in todo:
            start = time.perf_counter()
            if jobs[i].run_dir.exists():
                shutil.rmtree(jobs[i].run_dir)
            jobs[i].run_dir.mkdir(parents=True)
            (jobs[i].run_dir / "job.json").write_text(json.dumps(jobs[i].payload(), indent=1))
            try:
                row = run_job(jobs[i].payload())
            except Exception as e:  # noqa: BLE001 — one failed run is a row, as in a worker process
                row = _failed(jobs[i], f"{type(e).__name__}: {e}")
            report(i, row, time.perf_counter() - start)
        return [results[i] for i in range(len(jobs))]

    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    parallel = jobs_of(cfg)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    try:
        while todo or running:
            while todo and len(running) < parallel:
                i = todo.pop(0)
                running[i] = (_start(jobs[i], env), time.perf_counter())
            time.sleep(0.05)
            for i, (proc, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[i]
                    report(i, _collect(jobs[i], proc.returncode), time.perf_counter() - start)
    finally:  # interrupted: stop our workers now (PR_SET_PDEATHSIG covers a parent killed outright)
        for proc, _ in running.values():
            proc.kill()
            proc.wait()
    return [results[i] for i in range(len(jobs))]


# ---------------------------------------------------------------------------------------------------- the bench


@dataclass
class BenchPlan:
    """What ``run_bench`` will do, all validated: the runs, the lrs, the memory matches."""

    preset: BenchPreset
    entries: list[Entry]
    seeds: list[int]
    budgets: list[str]
    matches: dict[tuple[str, str], Match]
    full_mem: int | None
    planned: dict[str, int]  # with --budget: planned bytes (with activations)
    memory: dict[str, int]  # planned w+g+optim of each entry at its own rank
    skipped: list[dict[str, str]]
    tune: dict[str, Any] | None


def plan_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchPlan:
    """Validate everything and decide the runs (no training, nothing written)."""
    preset, entries = resolve(cfg)
    _check_protocol(cfg, preset)
    seeds = [cfg.seed + k for k in range(preset.seeds if cfg.seeds is None else cfg.seeds)]
    for e in entries:  # every setting and every option on the model, before the first run
        train_config(preset, e, cfg)
    memory = {e.label: train_memory(preset.model, e.spec.method, e.spec.options, preset.dtype, preset.vocab_size)
              for e in entries}
    planned, skipped = {}, []
    if cfg.budget:
        configs = {e.label: train_config(preset, e, cfg) for e in entries}
        kept, planned = select_by_budget(configs, entries, cfg.budget, log)
        skipped = [{"label": e.label, "budget": cfg.budget, "reason": f"planned {planned[e.label] / 2**30:.2f} GiB "
                    f"> {cfg.budget}"} for e in entries if e not in kept]
        entries = kept
    budgets = list(cfg.match_memory or [])
    if budgets == ["preset"]:
        if not preset.budgets:
            raise RankwiseError(f"preset {cfg.preset!r} has no memory budgets; give sizes, e.g. --match-memory 80%")
        budgets = list(preset.budgets)
    matches, full_mem = ({}, None)
    if budgets:
        matches, full_mem = match_budgets(preset, entries, budgets, cfg.memory_tolerance)
        log(f"memory plan (weights + gradients + optimizer state; full-rank AdamW: {full_mem / MIB:.1f} MiB):")
        for b in budgets:
            for e in entries:
                m = matches[(e.label, b)]
                if m.ok:
                    r = f"rank {m.rank}" if m.rank is not None else "(no rank)"
                    log(f"  {b:>8} {e.label:<24} {r:<10} {m.bytes / MIB:7.2f} MiB ({m.bytes / m.target:.3f} x)")
                else:
                    log(f"  {b:>8} {e.label:<24} skipped: {m.reason}")
                    skipped.append({"label": e.label, "budget": b, "reason": m.reason})
    tune = None
    if cfg.tune or cfg.tune_only:
        points = preset.tune_points if cfg.tune_points is None else cfg.tune_points
        span = preset.tune_span if cfg.tune_span is None else cfg.tune_span
        tune = {"points": points, "span": span, "rungs": list(preset.tune_rungs), "eta": preset.tune_eta,
                "horizons": rung_steps(preset.steps, preset.tune_rungs), "seeds": cfg.tune_seeds}
    return BenchPlan(preset, entries, seeds, budgets, matches, full_mem, planned, memory, skipped, tune)


def _tune(bp: BenchPlan, cfg: BenchConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Successive halving of every entry's lr; writes ``tuned.json`` and ``lr_sensitivity.png``."""
    from .report import plot_lr_sensitivity

    t = bp.tune
    tune_seeds = [cfg.seed + k for k in range(t["seeds"])]
    methods_out = {}
    for e in bp.entries:
        centre = (cfg.overrides.get("lr") or bp.preset.lr) * e.spec.lr_mult
        grid = lr_grid(centre, t["points"], t["span"])
        log(f"tune {e.label}: {len(grid)} lrs {grid[0]:.2e}..{grid[-1]:.2e}, rungs {t['horizons']} steps")

        def objective(lrs: list[float], steps: int, e: Entry = e) -> list[list[float]]:
            jobs = [Job(e.label, f"{e.label} lr {lr:.3g} @{steps}", None, s,
                        out / "tune" / _slug(e.label) / f"s{steps}_lr{lr:.4e}" / f"seed{s}",
                        _plain(train_config(bp.preset, e, cfg, lr=lr, seed=s, steps=steps)), cfg.threads)
                    for lr in lrs for s in tune_seeds]
            rows = execute(jobs, cfg, log)
            losses = [r["eval_loss"] if r["status"] == "ok" else math.inf for r in rows]
            k = len(tune_seeds)
            return [losses[i * k:(i + 1) * k] for i in range(len(lrs))]

        best, trials = successive_halving(grid, t["horizons"], t["eta"], objective)
        log(f"  {e.label}: tuned lr {best:.3g}")
        methods_out[e.label] = {"method": e.spec.method, "label": e.label, "lr": best, "grid_centre": centre,
                               "tuned": ["lr"], "fixed": {k: e.spec.options[k] for k in e.spec.fixed},
                               "options": e.spec.options, "sweep": [x.to_dict() for x in trials]}
    tuned = {"preset": cfg.preset, "steps": bp.preset.steps, "dtype": cfg.overrides.get("dtype", bp.preset.dtype),
             "grid": {k: t[k] for k in ("points", "span")},
             "successive_halving": {k: t[k] for k in ("rungs", "horizons", "eta")}, "seeds": tune_seeds,
             "objective": "final validation loss (mean over seeds)", "methods": methods_out}
    write_json_atomic(out / "tuned.json", tuned, indent=1)
    plot_lr_sensitivity(tuned, out / "lr_sensitivity.png")
    return methods_out


def ship_tuned(tuned_json: Path, command: str) -> Path:
    """Store a ``tuned.json`` in the package's ``tuned_lrs.json`` under its preset, with the command that made it.

    A sweep with the same protocol (steps, dtype, grid, successive halving, seeds) as the shipped one adds its methods to
    it (re-tuned methods replace theirs; ``commands`` lists every sweep); another protocol replaces the entry."""
    data = json.loads(TUNED_LRS.read_text())
    tuned = json.loads(tuned_json.read_text())
    presets = data.setdefault("presets", {})
    old = presets.get(tuned["preset"])
    protocol = ("steps", "dtype", "grid", "successive_halving", "seeds", "objective")
    if old and all(old.get(k) == tuned.get(k) for k in protocol):
        methods_ = {**old["methods"], **tuned["methods"]}
        commands = [*old.get("commands", []), *([command] if command not in old.get("commands", []) else [])]
    else:
        methods_, commands = tuned["methods"], [command]
    presets[tuned["preset"]] = {**tuned, "methods": methods_, "commands": commands}
    write_json_atomic(TUNED_LRS, data, indent=1)
    return TUNED_LRS


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every (method, budget, seed), write the results to ``cfg.out`` and return one record per run."""
    from ..data import prepare
    from .reference import ngram_reference
    from .report import write_results

    out = _check_out(cfg.out)
    bp = plan_bench(cfg, log)
    tuned, tuned_src = load_tuned(cfg.preset, cfg.tuned)
    fingerprint = _fingerprint(cfg, bp.preset, bp.entries, {
        "seeds": bp.seeds, "match_memory": bp.budgets, "memory_tolerance": cfg.memory_tolerance,
        "budget": cfg.budget, "tune": bp.tune, "tuned_lrs": None if bp.tune else tuned})
    _claim_out(out, fingerprint)
    # build the corpus cache once, before the workers share it
    corpus = prepare(cfg.overrides.get("data", bp.preset.data), bp.preset.vocab_size)
    if bp.tune:
        tuned, tuned_src = _tune(bp, cfg, out, log), "tuned.json (this run)"
        if cfg.tune_only:
            return []
    lrs = {e.label: entry_lr(bp.preset, e, cfg, tuned, this_run=bool(bp.tune)) for e in bp.entries}
    jobs = []
    for e in bp.entries:
        lr = lrs[e.label][0]
        for b in bp.budgets or [None]:
            options = dict(e.spec.options)
            if b is not None:
                m = bp.matches[(e.label, b)]
                if not m.ok:
                    continue
                if m.rank is not None:
                    options["rank"] = m.rank
            group = e.label if b is None else f"{e.label} @ {b}"
            for s in bp.seeds:
                run_dir = out / "runs" / _slug(e.label) / _slug(b or "default") / f"seed{s}"
                jobs.append(Job(e.label, group, b, s, run_dir,
                                _plain(train_config(bp.preset, e, cfg, lr=lr, seed=s, options=options)), cfg.threads))
    c = jobs[0].config if jobs else {}
    log(f"{len(jobs)} runs: {len(bp.entries)} methods x {len(bp.budgets) or 1} budget(s) x {len(bp.seeds)} seed(s) "
        f"on {bp.preset.model}, {c.get('steps')} steps x {c.get('batch_size', 0) * c.get('grad_accum', 0)} x "
        f"{c.get('seq_len')} tokens; lrs from {tuned_src}")
    rows = execute(jobs, cfg, log)
    for row, job in zip(rows, jobs):
        row.update(group=job.group, budget=job.budget, seed=job.seed)
        if job.label in bp.planned:
            row["planned_mem_bytes"] = bp.planned[job.label]
        if job.budget is not None:
            row["matched_mem_bytes"] = bp.matches[(job.label, job.budget)].bytes
    ref_cfg = jobs[0].config if jobs else asdict(train_config(bp.preset, bp.entries[0], cfg))
    reference = ngram_reference(corpus, ref_cfg["batch_size"], ref_cfg["seq_len"], ref_cfg["eval_batches"])
    lr_info = {e.label: {"lr": lrs[e.label][0], "source": lrs[e.label][1],
                         "tuned": (tuned.get(e.label) or tuned.get(e.name) or {}).get("tuned", [])
                         if "tuned" in lrs[e.label][1] else [],
                         "fixed": {k: e.spec.options[k] for k in e.spec.fixed}} for e in bp.entries}
    write_results(out, rows, bp, cfg, reference=reference, lr_info=lr_info)
    return rows
