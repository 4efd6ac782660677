"""Gradient-space algebra for memory-efficient full-parameter training: ``SplitOptimizer`` and its parts.

    from rankwise.optim import SplitOptimizer, build
    opt = build("fira", model, rank=64, lr=1e-2)
    opt = SplitOptimizer(model.parameters(), projector="rsvd", inner="adamw", residual="signsgd", rank=32)
"""

from .blocks import BLOCK_SELECTORS
from .optimizer import MOMENT_POLICIES, SplitOptimizer
from .presets import PRESETS, build, param_groups
from .projectors import COORDINATE_SUBSETS, PROJECTORS
from .rules import INNER_RULES, RESIDUAL_RULES

__all__ = ["SplitOptimizer", "build", "param_groups", "PRESETS", "PROJECTORS", "COORDINATE_SUBSETS", "BLOCK_SELECTORS",
           "INNER_RULES", "RESIDUAL_RULES", "MOMENT_POLICIES"]
