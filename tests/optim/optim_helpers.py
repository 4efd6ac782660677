"""A micro LLaMA (both matrix orientations: 80x32 and 32x80) and a fixed batch stream, for exact-identity tests."""

from __future__ import annotations

import pytest
import torch

from rankwise.models import build_model


def micro_model(seed: int = 0) -> torch.nn.Module:
    return build_model("tiny", vocab_size=128, seed=seed, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=64)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1000 + step))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = batch(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(autouse=True)
def single_thread():
    """Micro-model tests run single-threaded (imported into a module, it applies there): the matrices are tiny and
    spare threads only spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
