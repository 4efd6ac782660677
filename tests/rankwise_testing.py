"""Helpers shared by the test files (import as `from rankwise_testing import ...`)."""

import torch

from rankwise.train import TrainConfig


def quick_config(**overrides) -> TrainConfig:
    """A run small enough for CI: fp32 (exact), short sequences, few eval batches, no output."""
    base = dict(steps=20, batch_size=8, seq_len=64, lr=2e-3, warmup_steps=5, dtype="fp32", eval_every=0,
                eval_batches=4, quiet=True)
    return TrainConfig(**{**base, **overrides})


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (a stand-in for training), in parameter order."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``: tag -> [(step, value)] (tensorboard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
