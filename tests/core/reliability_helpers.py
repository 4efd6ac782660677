"""A micro causal LM and run helpers for the interrupt / non-finite / run-folder tests (fast on CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from rankwise_testing import quick_config

MICRO = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)


def micro_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **MICRO))


def write_micro_preset(folder: Path, vocab_size: int = 8192) -> str:
    """A transformers config folder of the micro model (``--preset FOLDER`` builds it, randomly initialised)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=vocab_size, **MICRO).save_pretrained(folder)
    return str(folder)


def micro_config(**overrides):
    base = dict(steps=6, batch_size=2, seq_len=16, warmup_steps=2, eval_every=2, eval_batches=1,
                checkpoint_every=0, lr=3e-3)
    return quick_config(**{**base, **overrides})


def fresh(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timing column."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
