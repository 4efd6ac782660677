"""LLaMA-style model presets (random init) built with ``transformers.LlamaConfig``.

The ``llama-*`` presets are GaLore's pre-training configs (Zhao et al. 2024, ``configs/llama_*.json``); ``tiny`` and
``small`` are CPU-sized versions of the same architecture. Any ``transformers`` causal LM works everywhere a preset does.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import RankwiseError


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 8192
    max_position_embeddings: int = 1024
    description: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(256, 4, 4, 688, description="~7.4M params, CPU tests and the default benchmark"),
    "mini": Preset(128, 4, 4, 344, 2048, description="~1.3M params (vocab 2048), the CPU benchmark (rankwise bench --preset tiny)"),
    "small": Preset(512, 8, 8, 1376, description="~34M params, CPU experiments"),
    "llama-60m": Preset(512, 8, 8, 1376, 32000, description="GaLore's 60M config (C4, 1.1B tokens)"),
    "llama-130m": Preset(768, 12, 12, 2048, 32000, description="GaLore's 130M config (C4, 2.2B tokens)"),
    "llama-350m": Preset(1024, 24, 16, 2736, 32000, description="GaLore's 350M config (C4, 6.4B tokens)"),
    "llama-1b": Preset(2048, 24, 32, 5461, 32000, description="GaLore's 1B config (C4, 13.1B tokens)"),
    "llama-7b": Preset(4096, 32, 32, 11008, 32000, 2048, description="LLaMA-7B shape, for the planner (meta device)"),
}


def llama_config(preset: str, vocab_size: int | None = None, **overrides):
    """The ``LlamaConfig`` of a preset; ``vocab_size`` follows the tokenizer when given."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise RankwiseError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)} "
                            "(or pass a transformers model / config directory)")
    p = asdict(PRESETS[preset])
    p.pop("description")
    if vocab_size is not None:
        p["vocab_size"] = vocab_size
    p.update(overrides)
    return LlamaConfig(rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="sdpa", **p)


def build_model(preset: str, vocab_size: int | None = None, seed: int | None = 0, device: str | torch.device = "cpu",
                **overrides) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` for ``preset``; ``device="meta"`` allocates nothing.

    ``preset`` may also be a local directory holding a transformers ``config.json`` (random init) or full weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if preset not in PRESETS and os.path.isdir(preset):
        if any(os.path.exists(os.path.join(preset, f)) for f in ("model.safetensors", "pytorch_model.bin",
                                                                 "model.safetensors.index.json")):
            return AutoModelForCausalLM.from_pretrained(preset).to(device)
        config = AutoConfig.from_pretrained(preset)
        with torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config)
    config = llama_config(preset, vocab_size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
