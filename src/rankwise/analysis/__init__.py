"""When is low rank justified? Instruments that answer it on a given model.

- ``spectra``: effective / energy / stable rank, principal angles (batched over equal-shaped matrices).
- ``layers.analyze_model``: per-layer weight and gradient spectra, gradient-subspace drift between batches.
- ``limits.attention_norms``: the norms behind LoRA's computational limits (Hu et al. 2024), per attention layer.
- ``fast_lora_grad``: the almost-linear polynomial-method LoRA attention gradient, for the bounded-norm regime.
- ``welore``: data-agnostic non-uniform rank reduction (Jaiswal et al. 2024) and its low-rank layers.
"""

from .fast_lora_grad import LoRAFactors, exact_lora_grad, fast_lora_grad, lora_attention_loss
from .layers import LayerReport, analyze_model, linear_weights
from .limits import attention_norms
from .spectra import (batched_svdvals, effective_rank, energy_rank, principal_angles, stable_rank,
                      subspace_overlap)
from .welore import CompressionReport, LowRankLinear, compress, densify, lrc_parameters, uniform_ranks, welore_ranks

__all__ = ["LoRAFactors", "exact_lora_grad", "fast_lora_grad", "lora_attention_loss", "LayerReport",
           "analyze_model", "linear_weights", "attention_norms", "batched_svdvals", "effective_rank", "energy_rank",
           "principal_angles", "stable_rank", "subspace_overlap", "CompressionReport", "LowRankLinear", "compress",
           "densify", "lrc_parameters", "uniform_ranks", "welore_ranks"]
