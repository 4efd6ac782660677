"""Helpers for the PEFT interop tests: both directions of the file format on ``ref_model.tiny_llama`` (square q/o,
rectangular k/v, gate/up, down), logits compared at a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch
from ref_model import tiny_llama

from rankwise import adapters

TARGET = ["q_proj", "k_proj", "up_proj", "down_proj"]  # 64x64, 32x64, 96x64, 64x96
LOGIT_TOL = 1e-5
LOAD_SEED = 11  # torch's global seed before each load (PEFT's pissa_niter_K draws from it)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=tokens()).logits


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (a stand-in for training), in parameter order."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def peft_saved(config, path: Path, std: float = 0.05) -> torch.Tensor:
    """Create ``config``'s adapter in PEFT on a fresh base, perturb it, save it to ``path``; return its logits."""
    from peft import get_peft_model

    base = tiny_llama(0)
    torch.manual_seed(LOAD_SEED)
    model = get_peft_model(base, config)
    perturb(model, std)
    model.eval().save_pretrained(str(path))
    return logits(model)


def peft_loaded(path: Path) -> torch.Tensor:
    """Logits of ``PeftModel.from_pretrained`` on a fresh base."""
    from peft import PeftModel

    base = tiny_llama(0)
    torch.manual_seed(LOAD_SEED)
    return logits(PeftModel.from_pretrained(base, str(path)).eval())


def rankwise_loaded(path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    base = tiny_llama(0)
    torch.manual_seed(LOAD_SEED)
    model = adapters.load_adapter(base, path).eval()
    return model, logits(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
