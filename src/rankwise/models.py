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
        check_model_folder(preset)
        try:
            if has_weights(preset):
                return AutoModelForCausalLM.from_pretrained(preset).to(device)
            config = AutoConfig.from_pretrained(preset)
        except (OSError, ValueError, KeyError) as e:  # RankwiseError is a ValueError: keep it as it is
            if isinstance(e, RankwiseError):
                raise
            raise RankwiseError(f"cannot load a transformers model from {preset!r}: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        with torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config)
    config = llama_config(preset, vocab_size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def has_weights(folder: str | os.PathLike) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES)


def check_model_folder(folder: str | os.PathLike) -> None:
    """A transformers model folder: a ``config.json`` that parses and names a ``model_type`` transformers knows."""
    import json

    from transformers import CONFIG_MAPPING

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise RankwiseError(f"{str(folder)!r} holds no config.json, so it is not a transformers model folder; "
                            f"give a folder with config.json [+ weights] or a preset ({', '.join(PRESETS)})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"{path!r} is not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise RankwiseError(f"{path!r} has unknown model_type {model_type!r}; transformers "
                            "knows e.g. llama, gpt2, mistral, qwen2")


def max_positions(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
