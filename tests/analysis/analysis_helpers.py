"""Small models and matrices with known spectra for the analysis tests."""

from __future__ import annotations

import torch


def small_llama(vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4, inter: int = 48, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, max_position_embeddings=128, tie_word_embeddings=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An m x n matrix whose singular values are exactly ``s`` (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=dtype))
    return (u * s.to(dtype)) @ v.T


def random_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]
