"""Small models and helpers shared by the adapter tests."""

from __future__ import annotations

import copy

import torch

from rankwise.models import build_model

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


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
