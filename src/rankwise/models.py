"""Models: LLaMA-style presets (random init) built with ``transformers.LlamaConfig``, and pretrained weights.

The ``llama-*`` presets are GaLore's pre-training configs (Zhao et al. 2024, ``configs/llama_*.json``); ``tiny`` and
``small`` are CPU-sized versions of the same architecture. Any ``transformers`` causal LM works everywhere a preset does.

A *model spec* (``rankwise train --model``) names pretrained weights: a ``rankwise train --out`` folder (its method
folded into plain layers), a transformers folder saved with ``save_pretrained``, or a Hugging Face hub name. Each
comes with its own tokenizer (``model_tokenizer``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import RankwiseError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "welore.safetensors")  # the last: `rankwise compress` factors (rankwise.analysis.welore)
TRAIN_CONFIG = "train_config.json"  # a run's training config (``config.json`` in runs before this name)


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

    ``preset`` may also be a local directory: a transformers ``config.json`` (random init), full weights, or a
    ``rankwise train --out`` folder (its weights, see ``load_pretrained``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if preset not in PRESETS and os.path.isdir(preset):
        if is_run(preset) or has_weights(preset):
            return load_pretrained(preset, device)
        check_model_folder(preset)
        try:
            config = AutoConfig.from_pretrained(preset)
        except (OSError, ValueError, KeyError) as e:
            raise RankwiseError(f"cannot load a transformers model config from {preset!r}: "
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


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``rankwise train --out`` folder (it holds a checkpoint)."""
    from .checkpoint import CHECKPOINT_FILE

    return os.path.isdir(path) and os.path.exists(os.path.join(path, CHECKPOINT_FILE))


def has_weights(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES)


def _looks_like_hub_name(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is not None and not spec.startswith((".", "-"))


def load_pretrained(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The weights named by a model spec: a run folder (its model rebuilt, checkpoint loaded, then adapters merged
    and reparameterized layers made dense, so any method can start from it), a transformers folder with weights, or
    a hub name (``AutoModelForCausalLM.from_pretrained``; needs internet the first time)."""
    from transformers import AutoModelForCausalLM

    if is_run(spec):
        from .train import load_run

        model = plain_model(load_run(spec).model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.to(device)
    if os.path.isdir(spec):
        if not has_weights(spec):
            raise RankwiseError(f"model folder {spec!r} holds no weights ({', '.join(WEIGHT_FILES[:2])}) and no "
                                "rankwise checkpoint; save it with save_pretrained, or pass it as --preset to "
                                "train its config from scratch")
        if os.path.exists(os.path.join(spec, "welore.safetensors")):
            from .analysis.welore import load_factored

            return load_factored(spec).to(device)
        check_model_folder(spec)
        try:
            return AutoModelForCausalLM.from_pretrained(spec).to(device)
        except (OSError, ValueError, KeyError) as e:  # a truncated or mismatched weights file
            raise RankwiseError(f"cannot load a transformers model from {spec!r}: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
    if spec in PRESETS or not _looks_like_hub_name(spec):
        raise RankwiseError(f"--model {spec!r} is not a folder or hub name; pass a `rankwise train --out` folder, a "
                            f"transformers model folder or a hub name (for a random init use --preset {spec})")
    try:
        return AutoModelForCausalLM.from_pretrained(spec).to(device)
    except Exception as e:  # OSError offline / unknown repo, ValueError for unsupported architectures
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise RankwiseError(f"could not load model {spec!r} from the Hugging Face hub ({type(e).__name__}: {first}); "
                            "there is no local folder of that name either: check the name and your internet "
                            "connection, or pass a local folder") from None


def model_tokenizer(spec: str) -> "PreTrainedTokenizerBase | None":
    """The tokenizer that belongs to a model spec or preset: a run's saved tokenizer, a folder's or hub model's
    ``AutoTokenizer``; ``None`` for a preset or a config-only folder without a tokenizer (pre-training from
    scratch, which trains a new BPE). A folder with weights but no tokenizer is an error, never a new BPE."""
    from .data.tokenizer import has_tokenizer, load_pretrained_tokenizer

    if spec in PRESETS:
        return None
    if is_run(spec):
        from .train import run_tokenizer

        return run_tokenizer(spec)
    if os.path.isdir(spec):
        if has_tokenizer(spec):
            return load_pretrained_tokenizer(spec)
        if has_weights(spec):
            raise RankwiseError(f"model folder {spec!r} has weights but no tokenizer (tokenizer.json / "
                                "tokenizer_config.json); save it there with tokenizer.save_pretrained, so the "
                                "data is tokenized as the model was trained")
        return None
    return load_pretrained_tokenizer(spec) if _looks_like_hub_name(spec) else None


@torch.no_grad()
def plain_model(model: nn.Module) -> nn.Module:
    """``model`` with every method-specific layer replaced, in place, by the ``nn.Linear`` it computes: adapters
    merged and unloaded, reparameterized layers (``dense_weight()``) made dense. Returns ``model``."""
    from .adapters import adapter_layers, merge_and_unload

    if adapter_layers(model):
        merge_and_unload(model)
    for name, m in list(model.named_modules()):
        if name and callable(getattr(m, "dense_weight", None)):
            weight = m.dense_weight()
            bias = getattr(m, "bias", None)
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
            model.set_submodule(name, dense)
    return model


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
