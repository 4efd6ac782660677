"""Weight-space parameterizations for pre-training from scratch: low-rank ``W = B A``, SLTrain ``B A + S``,
ReLoRA ``W + B A`` with merges, SwitchLoRA's switched rank vectors, SVD refactorization and optimizer-state resets
(registered as methods)."""

from .layers import LowRankLinear, ReLoRALinear, SparseLowRankLinear
from .slice_adamw import SliceAdamW
from .switchlora import SwitchLoRALinear
from .ops import prune_state, refactorize, replace_linears, reset_state, target_linears

__all__ = ["LowRankLinear", "ReLoRALinear", "SliceAdamW", "SparseLowRankLinear", "SwitchLoRALinear", "prune_state",
           "refactorize", "replace_linears", "reset_state", "target_linears"]
