"""Weight-space parameterizations for pre-training from scratch: low-rank ``W = B A``, SLTrain ``B A + S``,
ReLoRA ``W + B A`` with merges, SwitchLoRA's switched rank vectors, LOST ``gamma B A + (1 - gamma) S_channels``,
SST ``U diag(sigma) V^T`` with sampled singular vectors, SVD refactorization and optimizer-state resets
(registered as methods)."""

from .layers import ChannelSparseLowRankLinear, LowRankLinear, ReLoRALinear, SparseLowRankLinear
from .slice_adamw import SliceAdamW
from .switchlora import SwitchLoRALinear
from .ops import prune_state, refactorize, replace_linears, reset_state, target_linears
from .sst import SpectralLinear

__all__ = ["ChannelSparseLowRankLinear", "LowRankLinear", "ReLoRALinear", "SliceAdamW", "SparseLowRankLinear",
           "SpectralLinear", "SwitchLoRALinear", "prune_state", "refactorize", "replace_linears", "reset_state",
           "target_linears"]
