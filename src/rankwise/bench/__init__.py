"""``rankwise bench``: full-rank, gradient-space and weight-space methods pre-trained on the same tokens, for several
seeds, at tuned learning rates and optionally matched memory; compared on perplexity, memory and throughput
against n-gram reference levels, with the papers' claims checked (results.md, claims.md, plots)."""

from .budget import match_rank, planned_bytes, train_memory
from .claims import CLAIMS, Claim, check_claims, verdict
from .presets import PRESETS, BenchPreset, MethodSpec
from .runner import BenchConfig, plan_bench, run_bench
from .tune import lr_grid, successive_halving

__all__ = ["CLAIMS", "PRESETS", "BenchConfig", "BenchPreset", "Claim", "MethodSpec", "check_claims", "lr_grid",
           "match_rank", "plan_bench", "planned_bytes", "run_bench", "successive_halving", "train_memory",
           "verdict"]
