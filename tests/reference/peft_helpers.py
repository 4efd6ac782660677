"""Helpers for the PEFT interop tests: both directions of the file format on ``ref_model.tiny_llama`` (square q/o,
rectangular k/v, gate/up, down), logits compared at a fixed seed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from ref_model import tiny_llama
from rankwise_testing import perturb
from torch import nn

from rankwise import adapters

TARGET = ["q_proj", "k_proj", "up_proj", "down_proj"]  # 64x64, 32x64, 96x64, 64x96
LOGIT_TOL = 1e-5
LOAD_SEED = 11  # torch's global seed before each load (PEFT's pissa_niter_K draws from it)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=tokens()).logits


def peft_saved(config, path: Path, std: float = 0.05, make: Callable[[], nn.Module] = tiny_llama) -> torch.Tensor:
    """Create ``config``'s adapter in PEFT on a fresh base, perturb it, save it to ``path``; return its logits."""
    from peft import get_peft_model

    base = make()
    torch.manual_seed(LOAD_SEED)
    model = get_peft_model(base, config)
    perturb(model, std)
    model.eval().save_pretrained(str(path))
    return logits(model)


def peft_loaded(path: Path, make: Callable[[], nn.Module] = tiny_llama) -> torch.Tensor:
    """Logits of ``PeftModel.from_pretrained`` on a fresh base."""
    from peft import PeftModel

    base = make()
    torch.manual_seed(LOAD_SEED)
    return logits(PeftModel.from_pretrained(base, str(path)).eval())


def rankwise_loaded(path: Path, make: Callable[[], nn.Module] = tiny_llama) -> tuple[nn.Module, torch.Tensor]:
    base = make()
    torch.manual_seed(LOAD_SEED)
    model = adapters.load_adapter(base, path).eval()
    return model, logits(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def biased_llama() -> nn.Module:
    """``tiny_llama`` with biases in attention and MLP linears (for PEFT's ``bias`` option)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager", attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model
