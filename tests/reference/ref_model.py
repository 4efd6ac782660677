"""Side-by-side harness for the fidelity tests: one tiny LLaMA with square *and* rectangular matrices, fixed batches,
and a loop that steps two optimizers on two copies of it and reports the largest weight difference.

Shapes (hidden 64, 4 heads, 2 kv heads, FFN 96, vocab 128): q/o 64x64 (square), k/v 32x64 (m < n), gate/up 96x64
(m > n), down 64x96 (m < n), embeddings / head 128x64.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

TOL = 1e-5  # max |W_rankwise - W_reference| after the run, fp32


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def batches(n: int, seed: int = 0, batch: int = 4, seq: int = 16, vocab: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def side_by_side(make_ours: Callable[[nn.Module], torch.optim.Optimizer],
                 make_ref: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 30, seed: int = 0,
                 model: nn.Module | None = None, after_step: Callable[[int, nn.Module, nn.Module], None] | None = None
                 ) -> tuple[float, list[float], nn.Module, nn.Module]:
    """Train two identical copies for ``steps`` steps on the same batches, one optimizer each.

    Returns (max |dW| at the end, max |dW| after each step, our model, reference model). The per-step trace shows
    where two runs part (e.g. at a refresh). ``after_step(step, ours, ref)`` runs after both updates (schedules,
    layer switches).
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    ours = model if model is not None else tiny_llama(seed)
    ref = copy.deepcopy(ours)
    opt_ours, opt_ref = make_ours(ours), make_ref(ref)
    trace = []
    for step, batch in enumerate(batches(steps, seed), start=1):
        for m, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad(set_to_none=True)
            loss_of(m, batch).backward()
            opt.step()
        if after_step is not None:
            after_step(step, ours, ref)
        trace.append(max_weight_diff(ours, ref))
    return trace[-1], trace, ours, ref


def moved(model: nn.Module, seed: int = 0) -> float:
    """How far the weights moved from their init (so a test can show the difference is small *relative* to it)."""
    start = tiny_llama(seed, layers=len(model.model.layers))
    return max_weight_diff(model, start)
