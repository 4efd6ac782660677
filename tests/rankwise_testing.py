"""Helpers shared by the test files (import as `from rankwise_testing import ...`)."""

from rankwise.train import TrainConfig


def quick_config(**overrides) -> TrainConfig:
    """A run small enough for CI: fp32 (exact), short sequences, few eval batches, no output."""
    base = dict(steps=20, batch_size=8, seq_len=64, lr=2e-3, warmup_steps=5, dtype="fp32", eval_every=0,
                eval_batches=4, quiet=True)
    return TrainConfig(**{**base, **overrides})
