"""``rankwise bench``: full-rank, gradient-space and weight-space methods pre-trained on the same tokens, compared on
perplexity, memory and throughput (results.csv / results.md / plots)."""

from .budget import planned_bytes
from .presets import PRESETS, BenchPreset, MethodSpec
from .runner import BenchConfig, run_bench

__all__ = ["PRESETS", "BenchConfig", "BenchPreset", "MethodSpec", "planned_bytes", "run_bench"]
