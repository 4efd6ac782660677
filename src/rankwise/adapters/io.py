"""Save / load adapters in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<suffix>`` (PEFT's, adapter name removed). LoRA (plain, rsLoRA,
and the residual inits, saved as rank-2r LoRA relative to the original base) is written with PEFT's ``LoraConfig``
fields, so ``peft.PeftModel.from_pretrained`` loads it; PEFT LoRA files load here. Methods PEFT lacks write
``"peft_type": "RANKWISE"`` plus ``rankwise_method`` and ``rankwise_options``, with their own tensor suffixes in
the same layout; random bases are rebuilt from the stored seed.

``load_adapter`` validates everything (config, file integrity, module names, tensor names and shapes) on adapters
built off the model, and only then attaches them: a bad file raises ``RankwiseError`` and leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_atomic
from ..errors import RankwiseError
from .base import AdapterLinear, Parameterization
from .inject import _linear_names, adapter_layers, attach, build_parameterization, find_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT LoraConfig features rankwise does not implement: (field, value that means "off")
_UNSUPPORTED_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {},
                     "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
                     "use_qalora": False, "lora_bias": False}


def _adapters(model: nn.Module, adapter_name: str) -> dict[str, Parameterization]:
    found = {p: layer.adapters[adapter_name] for p, layer in adapter_layers(model).items()
             if adapter_name in layer.adapters}
    if not found:
        names = sorted({n for layer in adapter_layers(model).values() for n in layer.adapters})
        raise RankwiseError(f"the model has no adapter named {adapter_name!r} (it has: {', '.join(names) or 'none'})")
    return found


def adapter_config(adapters: dict[str, Parameterization], base_model_name_or_path: str | None) -> dict[str, Any]:
    first = next(iter(adapters.values()))
    targets = sorted(adapters)
    if first.peft_type == "LORA":
        r, alpha = first.file_rank_alpha()
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                "r": r, "lora_alpha": alpha, "lora_dropout": first.dropout, "use_rslora": first.rslora,
                "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    return {"peft_type": "RANKWISE", "rankwise_method": first.kind, "rankwise_options": first.options,
            "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, "target_modules": targets}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to folder ``path`` (each file atomically); returns the folder."""
    from safetensors.torch import save_file

    adapters = _adapters(model, adapter_name)
    merged = [p for p, layer in adapter_layers(model).items() if adapter_name in layer.merged]
    if merged:
        raise RankwiseError(f"adapter {adapter_name!r} is merged into {merged[0]} (and others); unmerge before saving")
    tensors = {f"{PREFIX}{p}.{k}": v.detach().to("cpu").contiguous()
               for p, a in adapters.items() for k, v in a.export_state().items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = json.dumps(adapter_config(adapters, base_model_name_or_path), indent=2)
    write_atomic(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config))
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise RankwiseError(f"no {CONFIG_FILE} in {str(path)!r}; pass a folder written by adapters.save_adapter or "
                            "PEFT's save_pretrained")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RankwiseError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise RankwiseError(f"{file} must hold a JSON object")
    return config


def _method_and_options(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = config.get("peft_type")
    if kind == "LORA":
        for field, off in _UNSUPPORTED_LORA.items():
            if config.get(field, off) not in (off, None, {}, False):
                raise RankwiseError(f"this PEFT LoRA adapter uses {field}={config[field]!r}, which rankwise does "
                                    "not support (plain LoRA / rsLoRA only)")
        try:
            return "lora", {"r": int(config["r"]), "alpha": float(config["lora_alpha"]),
                            "dropout": float(config.get("lora_dropout", 0.0)),
                            "rslora": bool(config.get("use_rslora", False))}
        except (KeyError, TypeError, ValueError) as e:
            raise RankwiseError(f"adapter config lacks a valid {e} (r and lora_alpha are required)") from None
    if kind == "RANKWISE":
        method, options = config.get("rankwise_method"), config.get("rankwise_options")
        if not isinstance(method, str) or not isinstance(options, dict):
            raise RankwiseError("RANKWISE adapter config needs rankwise_method (str) and rankwise_options (object)")
        return method, options
    raise RankwiseError(f"adapter peft_type {kind!r} is not supported; rankwise loads LORA and RANKWISE adapters")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise RankwiseError(f"no {WEIGHTS_FILE} in {str(path)!r}")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises several types for truncated / garbled files
        raise RankwiseError(f"{file} is corrupt or not a safetensors file ({type(e).__name__}: {e})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise RankwiseError(f"{file}: tensor {key!r} is {t.dtype}, an adapter's tensors are floating point")
        if not torch.isfinite(t).all():
            raise RankwiseError(f"{file}: tensor {key!r} holds NaN or inf; the adapter is damaged")
    return tensors


def _group_by_module(tensors: dict[str, torch.Tensor], linears: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {suffix: tensor}}``, matching each key to the longest linear-module prefix."""
    by_length = sorted(linears, key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise RankwiseError(f"adapter tensor {key!r} does not start with {PREFIX!r} (not a PEFT-layout file)")
        name = key[len(PREFIX):]
        path = next((p for p in by_length if name.startswith(p + ".")), None)
        if path is None:
            raise RankwiseError(f"adapter tensor {key!r} belongs to no linear layer of this model "
                                "(saved for another architecture?)")
        grouped.setdefault(path, {})[name[len(path) + 1:]] = value
    return grouped


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load the adapter in folder ``path`` into ``model`` as ``adapter_name`` (active, trainable); returns model."""
    path = Path(path)
    config = read_config(path)
    method, options = _method_and_options(config)
    existing = {n for layer in adapter_layers(model).values() for n in layer.adapters}
    if adapter_name in existing:
        raise RankwiseError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name")
    tensors = _read_tensors(path)
    grouped = _group_by_module(tensors, _linear_names(model))
    listed = load_targets(model, config.get("target_modules"))
    if listed is not None and listed != set(grouped):
        missing = sorted(listed - set(grouped))
        raise RankwiseError(f"adapter file has no tensors for {len(missing)} target module(s), e.g. "
                            f"{missing[:3]} (truncated or mismatched file)" if missing else
                            f"adapter file has tensors for modules outside its target_modules: "
                            f"{sorted(set(grouped) - listed)[:3]}")
    modules = {}
    for p in sorted(grouped):
        layer = model.get_submodule(p)
        base = layer.base_layer if isinstance(layer, AdapterLinear) else layer
        param = build_parameterization(method, base, options, p)
        param.check_state(grouped[p], p)
        param.import_state(grouped[p])
        param.train(model.training)
        modules[p] = param
    attach(model, adapter_name, modules)
    return model


def load_targets(model: nn.Module, target_modules: Any) -> set[str] | None:
    """The modules a config's ``target_modules`` selects in ``model`` (None when the config has none)."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str) and target_modules != "all-linear":  # PEFT: a string is a regex
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise RankwiseError(f"target_modules {target_modules!r} is not a valid regex ({e})") from None
        return {n for n in _linear_names(model) if pattern.fullmatch(n)}
    if isinstance(target_modules, (list, str)):
        return set(find_targets(model, target_modules))
    raise RankwiseError(f"target_modules must be a list of names or a regex, got {target_modules!r}")
