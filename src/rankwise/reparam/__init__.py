"""Weight-space parameterizations for pre-training from scratch: low-rank ``W = B A``, SLTrain ``B A + S``,
ReLoRA ``W + B A`` with merges, SVD refactorization and optimizer-state resets (registered as methods)."""

from .layers import LowRankLinear, ReLoRALinear, SparseLowRankLinear
from .ops import prune_state, refactorize, replace_linears, reset_state, target_linears

__all__ = ["LowRankLinear", "ReLoRALinear", "SparseLowRankLinear", "prune_state", "refactorize", "replace_linears",
           "reset_state", "target_linears"]
