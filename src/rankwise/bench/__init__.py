"""``rankwise bench``: full-rank, gradient-space and weight-space methods pre-trained on the same tokens, compared on
perplexity, memory and throughput (results.csv / results.md / plots)."""

from .budget import MemoryPlan, parse_size, plan
from .presets import PRESETS, BenchPreset, MethodSpec
from .runner import BenchConfig, run_bench

__all__ = ["PRESETS", "BenchConfig", "BenchPreset", "MemoryPlan", "MethodSpec", "parse_size", "plan", "run_bench"]
