"""Small models and helpers shared by the adapter tests."""

from __future__ import annotations

import copy

import torch

from rankwise.models import build_model
from rankwise_testing import perturb  # noqa: F401  (re-exported for the adapter tests)

VOCAB = 512
KINDS = ["lora", "nola", "vera", "randlora", "lora-xs"]


def small_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA (hidden 64, ffn 128, vocab 512): a few ms per forward."""
    model = build_model("tiny", vocab_size=VOCAB, seed=seed, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4)
    return model.eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
