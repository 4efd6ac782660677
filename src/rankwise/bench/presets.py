"""Benchmark presets: one model, one data source, one schedule, and the methods compared on it.

``tiny`` is the CPU benchmark (~10 minutes on 2 cores for the 8 default methods). The ``llama-*`` presets are
GaLore's C4 pre-training recipes (``scripts/benchmark_c4/llama_*.sh``: total batch 512 sequences of 256 tokens,
10k / 20k / 60k / 100k steps, 10% warmup, bf16, GaLore lr 0.01 with scale 0.25 and update gap 200) with the ranks of
GaLore's Table 2 (128 / 256 / 256 / 512); ReLoRA's numbers are from its 60M script (merge every 1000 steps, 100
re-warmup steps), SLTrain's from its scripts (lr 0.003, delta 0.03, alpha 32). They need a GPU and ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RankwiseError


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark entry: a registered method, its options, and a learning-rate multiplier on the preset's lr."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0


@dataclass(frozen=True)
class BenchPreset:
    model: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    methods: dict[str, MethodSpec]
    grad_accum: int = 1
    dtype: str = "bf16"
    eval_every: int = 50
    eval_batches: int = 8
    data: str = "stdlib-docs"
    vocab_size: int = 8192
    description: str = ""


# GaLore's convention: its lr is 10x the full-rank one and the projected update is scaled by 0.25. In ``tiny`` the
# galore/fira lr is 4x the preset's, so that the projected matrices move at the same effective lr as everyone else.
def _tiny_methods(rank: int = 64, gap: int = 50) -> dict[str, MethodSpec]:
    return {
        "full": MethodSpec("full"),
        "galore": MethodSpec("galore", {"rank": rank, "update_gap": gap, "scale": 0.25}, 4.0),
        "fira": MethodSpec("fira", {"rank": rank, "update_gap": gap, "scale": 0.25}, 4.0),
        "frugal": MethodSpec("frugal", {"rank": rank, "update_gap": gap}),
        "lowrank": MethodSpec("lowrank", {"rank": rank}),
        "lowrank-rr": MethodSpec("lowrank-rr", {"rank": rank, "refactor_every": gap, "reset_moments": True}),
        "relora": MethodSpec("relora", {"rank": rank, "reset_every": gap, "restart_warmup": 10}),
        "sltrain": MethodSpec("sltrain", {"rank": rank}),
    }


def _gpu_methods(rank: int) -> dict[str, MethodSpec]:
    """Base lr 1e-3 (GaLore's full-rank baseline for 60M/130M); GaLore/Fira 1e-2 with scale 0.25; SLTrain 3e-3."""
    return {
        "full": MethodSpec("full"),
        "galore": MethodSpec("galore", {"rank": rank, "update_gap": 200, "scale": 0.25}, 10.0),
        "fira": MethodSpec("fira", {"rank": rank, "update_gap": 200, "scale": 0.25}, 10.0),
        "frugal": MethodSpec("frugal", {"rank": rank, "update_gap": 200}),
        "lowrank": MethodSpec("lowrank", {"rank": rank}),
        "lowrank-rr": MethodSpec("lowrank-rr", {"rank": rank, "refactor_every": 200, "reset_moments": True}),
        "relora": MethodSpec("relora", {"rank": rank, "reset_every": 1000, "restart_warmup": 100}),
        "sltrain": MethodSpec("sltrain", {"rank": rank, "density": 0.03, "alpha": 32.0}, 3.0),
    }


def _c4(model: str, steps: int, rank: int, micro_batch: int, tokens: str) -> BenchPreset:
    return BenchPreset(model=model, steps=steps, batch_size=micro_batch, grad_accum=512 // micro_batch, seq_len=256,
                       lr=1e-3, warmup_steps=steps // 10, methods=_gpu_methods(rank), eval_every=1000,
                       eval_batches=max(1, 8192 // micro_batch), data="hf:allenai/c4:en", vocab_size=32000,
                       description=f"GaLore's C4 recipe, {steps} steps x 512 x 256 tokens ({tokens} in GaLore's "
                                   f"Table 2), rank {rank}; needs a GPU")


PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(model="tiny", steps=150, batch_size=8, seq_len=128, lr=2e-3, warmup_steps=15,
                        methods=_tiny_methods(), eval_every=50, eval_batches=8,
                        description="7.4M-param LLaMA on the embedded corpus, 150 steps x 1024 tokens, rank 64; "
                                    "~10 min for 8 methods on 2 CPU cores"),
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
    ``lr_scale`` sets the entry's learning-rate multiplier (e.g. ``full:lr_scale=4``)."""
    import json

    label, _, rest = spec.strip().partition(":")
    base = preset.methods.get(label, MethodSpec(label))
    options, lr_scale = dict(base.options), base.lr_scale
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RankwiseError(f"method option {item!r} in {spec!r} is not KEY=VALUE (e.g. galore:rank=32)")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key == "lr_scale":
            if not isinstance(parsed, (int, float)) or not parsed > 0:
                raise RankwiseError(f"lr_scale must be a positive number, got {value!r} in {spec!r}")
            lr_scale = float(parsed)
        else:
            options[key.replace("-", "_")] = parsed
    return spec.strip(), replace(base, options=options, lr_scale=lr_scale)
