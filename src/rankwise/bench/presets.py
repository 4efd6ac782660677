"""Benchmark presets: one model, one data source, one schedule, the methods compared on it, and the protocol
(seeds, memory budgets, learning-rate grid).

``tiny`` is the CPU benchmark: the 1.3M-parameter ``mini`` LLaMA (hidden 128, 4 blocks, vocab 2048) for 160 steps x
8 x 128 tokens in fp32 (bf16 autocast is 8x slower on a CPU without native bf16, e.g. AVX2-only), 3 seeds, one
intra-op thread per run and one run per core, sized so that the README's main command
takes at most 15 minutes on 2 idle cores (measured: docs/bench.md). The ``llama-*`` presets are GaLore's C4 pre-training recipes
(``scripts/benchmark_c4/llama_*.sh``: total batch 512 sequences of 256 tokens, 10k / 20k / 60k / 100k steps, 10%
warmup, bf16, GaLore lr 0.01 with scale 0.25 and update gap 200) with the ranks of GaLore's Table 2 (128 / 256 /
256 / 512); ReLoRA's numbers are from its 60M script (merge every 1000 steps, 100 re-warmup steps), SLTrain's from
its scripts (lr 0.003, delta 0.03, alpha 32), SwitchLoRA's from its 350M script (lr 0.02 = 20x full-rank's, interval
40, 5 frozen steps, descent at 0.1 of the run). They need a GPU and ``datasets``. ``gpu-60m`` is GaLore's 60M model on
the embedded stdlib-code corpus, for ``benchmarks/gpu_bench.sh`` (one GPU, minutes, offline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RankwiseError


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark entry: a registered method and its options.

    ``lr_mult``: the preset's lr for this entry relative to the base lr, used when no tuned lr is shipped and as the
    centre of the tuning grid. ``lr_scale``: the user's multiplier on the entry's tuned (or default) lr
    (``full:lr_scale=3``). ``fixed``: options held at the paper's value while the lr is tuned (GaLore's ``scale``).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr_mult: float = 1.0
    lr_scale: float = 1.0
    fixed: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchPreset:
    model: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    methods: dict[str, MethodSpec]  # every entry the preset defines (tuned lrs, options), runnable by --methods
    grad_accum: int = 1
    dtype: str = "bf16"
    eval_every: int = 50
    eval_batches: int = 8
    data: str = "stdlib-docs"
    vocab_size: int = 8192
    seeds: int = 1  # runs per method (seeds 0..N-1 offset by --seed): init and data order both follow the seed
    budgets: tuple[str, ...] = ()  # the protocol's --match-memory budgets ("80%" = of full-rank's w+g+optim)
    tune_points: int = 7  # lr grid: points, log-spaced over tune_span x around the preset's lr
    tune_span: float = 64.0
    tune_rungs: tuple[float, ...] = (0.25, 1.0)  # successive halving: fractions of the schedule, last = full
    tune_eta: int = 3  # each rung keeps the best ceil(n / eta)
    description: str = ""
    default_methods: tuple[str, ...] = ()  # what runs without --methods (empty: every entry of ``methods``)

    def defaults(self) -> list[str]:
        return list(self.default_methods or self.methods)


# GaLore's convention: its lr is larger than full-rank's and the projected update is scaled by 0.25; in the CPU
# presets galore/fira start (untuned) at 4x the base lr, so the projected matrices move at the base lr. APOLLO's
# update per channel has the norm of its low-rank Adam direction's, sqrt(r/d) of AdamW's (so sqrt(d/r) = 2 at rank 32
# of the mini model's 128; APOLLO-Mini's scale 128 makes up for rank 1: 1x); its scripts use lr 1e-2, as GaLore's.
def _cpu_methods(rank: int, gap: int, warmup: int, steps: int = 240) -> dict[str, MethodSpec]:
    return {
        "full": MethodSpec("full"),
        "galore": MethodSpec("galore", {"rank": rank, "update_gap": gap, "scale": 0.25}, 4.0, fixed=("scale",)),
        "galore-8bit": MethodSpec("galore-8bit", {"rank": rank, "update_gap": gap, "scale": 0.25}, 4.0,
                                  fixed=("scale",)),
        "fira": MethodSpec("fira", {"rank": rank, "update_gap": gap, "scale": 0.25}, 4.0, fixed=("scale",)),
        "apollo": MethodSpec("apollo", {"rank": rank, "update_gap": gap, "scale": 1.0}, 2.0, fixed=("scale",)),
        "apollo-mini": MethodSpec("apollo-mini", {"rank": 1, "update_gap": gap, "scale": 128.0}, fixed=("scale",)),
        "frugal": MethodSpec("frugal", {"rank": rank, "update_gap": gap}),
        "lowrank": MethodSpec("lowrank", {"rank": rank}),
        "lowrank-rr": MethodSpec("lowrank-rr", {"rank": rank, "refactor_every": gap, "reset_moments": True}),
        "relora": MethodSpec("relora", {"rank": rank, "reset_every": gap, "restart_warmup": warmup}),
        # GaLore's Table 2 LoRA baseline (ReLoRA's code without a merge): W frozen at its init + (alpha/r) B A,
        # embeddings, norms and head trained
        "lora": MethodSpec("relora", {"rank": rank, "reset_every": steps + 1, "restart_warmup": 0}),
        "sltrain": MethodSpec("sltrain", {"rank": rank}),
        "sst": MethodSpec("sst", {"rank": rank, "resample_every": gap}),
        "lost": MethodSpec("lost", {"rank": rank}),
        # SwitchLoRA's 1/r scaling wants a larger lr (its scripts: 20x full-rank's at rank 256); on `mini`, 100 steps,
        # eval loss 5.67 / 4.89 / 4.89 at lr 3e-3 / 1.2e-2 / 3e-2: 4x until tuned
        "switchlora": MethodSpec("switchlora", {"rank": rank, "descent_steps": max(1, steps // 10)}, 4.0),
    }


def _gpu_methods(rank: int, gap: int = 200, merge: int = 1000, rewarm: int = 100,
                 steps: int = 10_000) -> dict[str, MethodSpec]:
    """Base lr 1e-3 (GaLore's full-rank baseline for 60M/130M); GaLore/Fira 1e-2 with scale 0.25; APOLLO /
    APOLLO-Mini 1e-2 with scale 1 / 128 (APOLLO's scripts/pretrain_c4); SLTrain 3e-3; SwitchLoRA 2e-2 (its 350M
    script: ``--lr 0.02``, interval 40, descent rate 0.1 of the run's steps)."""
    return {
        "full": MethodSpec("full"),
        "galore": MethodSpec("galore", {"rank": rank, "update_gap": gap, "scale": 0.25}, 10.0, fixed=("scale",)),
        "galore-8bit": MethodSpec("galore-8bit", {"rank": rank, "update_gap": gap, "scale": 0.25}, 10.0,
                                  fixed=("scale",)),
        "fira": MethodSpec("fira", {"rank": rank, "update_gap": gap, "scale": 0.25}, 10.0, fixed=("scale",)),
        "apollo": MethodSpec("apollo", {"rank": rank, "update_gap": gap, "scale": 1.0}, 10.0, fixed=("scale",)),
        "apollo-mini": MethodSpec("apollo-mini", {"rank": 1, "update_gap": gap, "scale": 128.0}, 10.0,
                                  fixed=("scale",)),
        "frugal": MethodSpec("frugal", {"rank": rank, "update_gap": gap}),
        "lowrank": MethodSpec("lowrank", {"rank": rank}),
        "lowrank-rr": MethodSpec("lowrank-rr", {"rank": rank, "refactor_every": gap, "reset_moments": True}),
        "relora": MethodSpec("relora", {"rank": rank, "reset_every": merge, "restart_warmup": rewarm}),
        "sltrain": MethodSpec("sltrain", {"rank": rank, "density": 0.03, "alpha": 32.0}, 3.0),
        "sst": MethodSpec("sst", {"rank": rank, "resample_every": 200, "uniform_mix": 0.5}),
        "lost": MethodSpec("lost", {"rank": rank, "sparsity": 0.05, "gamma": 0.5, "sparse_svd_rank": 256}),
        "switchlora": MethodSpec("switchlora", {"rank": rank, "interval": 40.0, "descent_steps": max(1, steps // 10),
                                                "frozen_steps": 5}, 20.0),
    }


def _c4(model: str, steps: int, rank: int, micro_batch: int, tokens: str) -> BenchPreset:
    return BenchPreset(model=model, steps=steps, batch_size=micro_batch, grad_accum=512 // micro_batch, seq_len=256,
                       lr=1e-3, warmup_steps=steps // 10, methods=_gpu_methods(rank, steps=steps), eval_every=1000,
                       eval_batches=max(1, 8192 // micro_batch), data="hf:allenai/c4:en", vocab_size=32000,
                       description=f"GaLore's C4 recipe, {steps} steps x 512 x 256 tokens ({tokens} in GaLore's "
                                   f"Table 2), rank {rank}; needs a GPU")


# The README's main command (<= 15 minutes on 2 idle cores: 27 runs of ~1 min, two at a time) and the second
# command over the same regime, tuned lrs and tokens: the memory-frontier methods with full-rank AdamW and GaLore
# as anchors (their runs are bit-identical to the main command's)
TINY_CORE = ("full", "galore", "fira", "frugal", "lowrank", "lowrank-rr", "relora", "lora", "sltrain")
TINY_FRONTIER = ("full", "galore", "galore-8bit", "apollo", "apollo-mini", "sst", "lost", "switchlora")

PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(model="mini", steps=160, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=16, dtype="fp32",
                        methods=_cpu_methods(rank=32, gap=40, warmup=10, steps=160), eval_every=80, eval_batches=16,
                        vocab_size=2048, seeds=3, budgets=("100%", "80%", "60%"), default_methods=TINY_CORE,
                        description="1.3M-param LLaMA (hidden 128, vocab 2048) on the embedded corpus, 160 steps x "
                                    "1024 tokens in fp32, rank 32, 3 seeds, one thread per run; by default the 9 methods of "
                                    "TINY_CORE (<= 15 min on 2 cores), the memory frontier with --methods "
                                    "(TINY_FRONTIER)"),
    "gpu-60m": BenchPreset(model="llama-60m", steps=400, batch_size=128, seq_len=256, lr=1e-3, warmup_steps=40,
                           methods=_gpu_methods(128, gap=100, merge=200, rewarm=20, steps=400), eval_every=100,
                           eval_batches=8, data="stdlib-code", vocab_size=8192, seeds=1,
                           description="GaLore's 60M model on the embedded stdlib-code corpus (offline, ~10 MB), "
                                       "128 x 256 "
                                       "tokens a step, rank 128; one GPU, benchmarks/gpu_bench.sh"),
    "llama-60m": _c4("llama-60m", 10_000, 128, 128, "1.1B"),
    "llama-130m": _c4("llama-130m", 20_000, 256, 64, "2.2B"),
    "llama-350m": _c4("llama-350m", 60_000, 256, 32, "6.4B"),
    "llama-1b": _c4("llama-1b", 100_000, 512, 16, "13.1B"),
}


def get(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise RankwiseError(f"unknown bench preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_method(spec: str, preset: BenchPreset) -> tuple[str, MethodSpec]:
    """``galore`` (the preset's entry, or the method's defaults) or ``galore:rank=32,update_gap=100`` (options
    on top of the preset's); values are JSON when they parse (``true``, ``0.5``), else strings. The key
    ``lr_scale`` multiplies the entry's tuned lr (e.g. ``full:lr_scale=3``)."""
    label, _, rest = spec.strip().partition(":")
    if not label:
        raise RankwiseError(f"method spec {spec!r} has no method name; write e.g. galore:rank=32")
    base = preset.methods.get(label, MethodSpec(label))
    options, lr_scale = dict(base.options), 1.0
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RankwiseError(f"method option {item!r} in {spec!r} is not KEY=VALUE (e.g. galore:rank=32)")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key == "lr_scale":
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or not 0 < parsed < float("inf"):
                raise RankwiseError(f"lr_scale must be a positive number, got {value!r} in {spec!r}")
            lr_scale = float(parsed)
        else:
            options[key.replace("-", "_")] = parsed
    return spec.strip(), replace(base, options=options, lr_scale=lr_scale)
