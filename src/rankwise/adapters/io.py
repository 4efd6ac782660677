"""Save / load adapters in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<suffix>`` (PEFT's, adapter name removed); model-level tensors
(VeRA's shared bases) are ``base_model.<name>``. Methods PEFT has (``peft_type`` LORA, VERA, RANDLORA) are written
with PEFT's config fields and parameterization, so ``peft.PeftModel.from_pretrained`` loads them with the same
logits, and PEFT's files of these types load here (LoRA with residual inits saved as rank-2r LoRA relative to the
original base; PEFT files saved as-is with ``init_lora_weights="pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` are
loaded as PEFT loads them: the init is re-run on the fresh base). Methods PEFT lacks write
``"peft_type": "RANKWISE"`` plus ``rankwise_method`` and ``rankwise_options``, with their own tensor suffixes in
the same layout; random bases are rebuilt from the stored seed. PEFT config fields rankwise does not implement are
refused with a message naming the field.

LoRA's PEFT options are read and written: ``rank_pattern`` / ``alpha_pattern``, ``exclude_modules``, ``bias``
(trained biases, keys ``<module>[.base_layer].bias``), ``modules_to_save`` (full copies, keys ``<module>.<param>``)
and ``use_dora`` (``lora_magnitude_vector``).

``load_adapter`` validates everything (config, file integrity, module names, tensor names and shapes) on adapters
built off the model, and only then attaches them: a bad file raises ``RankwiseError`` and leaves the model untouched.
"""

from __future__ import annotations

import json
import re
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_atomic
from ..errors import RankwiseError
from .base import PARAMETERIZATIONS, AdapterLinear, Parameterization
from .inject import (_linear_names, adapter_layers, attach, base_linear, build_parameterization, find_targets,
                     find_modules_to_save, method_class, module_copies, copy_of, trained_biases)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
MODEL_PREFIX = "base_model."


def _adapters(model: nn.Module, adapter_name: str) -> dict[str, Parameterization]:
    found = {p: layer.adapters[adapter_name] for p, layer in adapter_layers(model).items()
             if adapter_name in layer.adapters}
    if not found:
        names = sorted({n for layer in adapter_layers(model).values() for n in layer.adapters})
        raise RankwiseError(f"the model has no adapter named {adapter_name!r} (it has: {', '.join(names) or 'none'})")
    return found


def _peft_classes() -> dict[str, type[Parameterization]]:
    return {cls.peft_type: cls for cls in PARAMETERIZATIONS.values() if cls.peft_type}


def adapter_config(adapters: dict[str, Parameterization], base_model_name_or_path: str | None) -> dict[str, Any]:
    first = next(iter(adapters.values()))
    targets = sorted(adapters)
    exclude = first.exclude
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, "target_modules": targets}
    if first.peft_type in (None, "LORA", "ADALORA"):  # PEFT's VeraConfig / RandLoraConfig have no exclude_modules
        common["exclude_modules"] = sorted(exclude) if isinstance(exclude, list) else exclude
    if first.peft_type:
        # PEFT sets fan_in_fan_out by the layer type (True for Conv1D) and writes it to the config
        fan_in_fan_out = any(a.fan_in_fan_out for a in adapters.values())
        return {"peft_type": first.peft_type, **common, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
                "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
                **type(first).peft_fields(adapters)}
    return {"peft_type": "RANKWISE", "rankwise_method": first.kind, "rankwise_options": first.options, **common}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to folder ``path`` (each file atomically); returns the folder."""
    from safetensors.torch import save_file

    adapters = _adapters(model, adapter_name)
    merged = [p for p, layer in adapter_layers(model).items() if adapter_name in layer.merged]
    if merged:
        raise RankwiseError(f"adapter {adapter_name!r} is merged into {merged[0]} (and others); unmerge before saving")
    cls = type(next(iter(adapters.values())))
    model_keys, shared_keys = cls.model_keys, cls.shared_keys
    tensors, seen = {}, set()
    for p, a in adapters.items():
        for k, v in a.export_state().items():
            keys = ([f"{MODEL_PREFIX}{k}"] if k in model_keys else []) + \
                   ([f"{PREFIX}{p}.{k}"] if k not in model_keys or k in shared_keys else [])
            for key in keys:  # safetensors wants one storage per key: shared bases written twice are copied
                if key not in tensors:
                    t = v.detach().to("cpu").contiguous()
                    tensors[key] = t.clone() if t.data_ptr() in seen else t
                    seen.add(tensors[key].data_ptr())
    for name, p in trained_biases(model, [adapter_name]).items():  # PEFT's bias="all" / "lora_only" keys
        tensors[f"{PREFIX}{name}"] = p.detach().to("cpu").contiguous()
    for module, wrapper in module_copies(model).items():  # modules_to_save: the copy's own keys under its path
        if adapter_name in wrapper.copies:
            for k, v in wrapper.copies[adapter_name].state_dict().items():
                tensors[f"{PREFIX}{module}.{k}"] = v.detach().to("cpu").contiguous()
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
    peft = _peft_classes()
    if kind in peft:
        return peft[kind].kind, peft[kind].options_from_peft(config)
    if kind == "RANKWISE":
        method, options = config.get("rankwise_method"), config.get("rankwise_options")
        if not isinstance(method, str) or not isinstance(options, dict):
            raise RankwiseError("RANKWISE adapter config needs rankwise_method (str) and rankwise_options (object)")
        if method_class(method).peft_type:
            raise RankwiseError(f"this {method} adapter was saved in rankwise's own format by an older rankwise, whose "
                                f"{method} bases and scaling differ from PEFT's (now used); it cannot be loaded "
                                f"exactly: retrain, or load it with the rankwise version that wrote it")
        return method, options
    raise RankwiseError(f"adapter peft_type {kind!r} is not supported; rankwise loads "
                        f"{', '.join(sorted(peft))} and RANKWISE adapters")


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


def _group_by_module(tensors: dict[str, torch.Tensor], linears: list[str]
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(``{module path: {suffix: tensor}}``, model-level ``{name: tensor}``), matching each key to the longest
    linear-module prefix."""
    by_length = sorted(linears, key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    model_level: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(MODEL_PREFIX):
            raise RankwiseError(f"adapter tensor {key!r} does not start with {PREFIX!r} (not a PEFT-layout file)")
        if not key.startswith(PREFIX):
            model_level[key[len(MODEL_PREFIX):]] = value
            continue
        name = key[len(PREFIX):]
        path = next((p for p in by_length if name.startswith(p + ".")), None)
        if path is None:
            raise RankwiseError(f"adapter tensor {key!r} belongs to no linear layer of this model "
                                "(saved for another architecture?)")
        grouped.setdefault(path, {})[name[len(path) + 1:]] = value
    return grouped, model_level


def _share(grouped: dict[str, dict[str, torch.Tensor]], keys: tuple[str, ...], like: torch.Tensor) -> None:
    """Equal copies of a shared tensor (PEFT writes RandLoRA's bases under every layer) become one tensor, on the
    device and in the dtype of ``like``."""
    for key in keys:
        first = None
        for tensors in grouped.values():
            if key in tensors:
                t = tensors[key].to(device=like.device, dtype=like.dtype)
                if first is not None and t.shape == first.shape and torch.equal(t, first):
                    t = first
                first = t if first is None else first
                tensors[key] = t


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load the adapter in folder ``path`` into ``model`` as ``adapter_name`` (active, trainable); returns model."""
    path = Path(path)
    config = read_config(path)
    method, options = _method_and_options(config)
    cls = method_class(method)
    existing = {n for layer in adapter_layers(model).values() for n in layer.adapters}
    if adapter_name in existing:
        raise RankwiseError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name")
    tensors = _read_tensors(path)
    saved = config.get("modules_to_save") if config.get("peft_type") == "LORA" else None
    copies = _module_copies(model, saved, tensors) if saved else {}
    bias = config.get("bias", "none") if config.get("peft_type") == "LORA" else "none"
    biases = _bias_targets(model, {k: tensors.pop(k) for k in list(tensors) if k.endswith(".bias")}, bias)
    grouped, model_level = _group_by_module(tensors, _linear_names(model))
    exclude = _exclude(config.get("exclude_modules"))
    listed = load_targets(model, config.get("target_modules"), exclude)
    if listed is not None and listed != set(grouped):
        missing = sorted(listed - set(grouped))
        raise RankwiseError(f"adapter file has no tensors for {len(missing)} target module(s), e.g. "
                            f"{missing[:3]} (truncated or mismatched file)" if missing else
                            f"adapter file has tensors for modules outside its target_modules: "
                            f"{sorted(set(grouped) - listed)[:3]}")
    if not grouped:
        raise RankwiseError(f"adapter file {path / WEIGHTS_FILE} holds no tensors for any layer")
    unexpected = sorted(set(model_level) - set(cls.model_keys))
    if unexpected:
        raise RankwiseError(f"adapter file has model-level tensors {unexpected} that a {method} adapter does not use")
    grouped = cls.file_layers(config, grouped)
    for tensors_of in grouped.values():  # a layer's own copy of a shared tensor wins (PEFT's RandLoRA has both)
        for k, v in model_level.items():
            tensors_of.setdefault(k, v)
    paths = [p for p in _linear_names(model) if p in grouped]  # model order (PEFT's: inits that draw randomness)
    bases = {p: base_linear(model, p) for p in paths}
    options = {**options, **cls.model_options(list(bases.values()), options)}
    _share(grouped, cls.shared_keys + cls.model_keys,
           next(iter(bases.values())).weight)
    modules = {}
    for p, base in bases.items():
        param = build_parameterization(method, base, options, p)
        param.check_state(grouped[p], p)
        param.import_state(grouped[p])
        param.train(model.training)
        param.exclude = exclude
        param.train_bias = bias
        param.modules_to_save = saved
        modules[p] = param
    with torch.no_grad():
        for target, value in biases:
            target.copy_(value)
    attach(model, adapter_name, modules, copies)
    return model


def _module_copies(model: nn.Module, names: Any, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """PEFT's ``modules_to_save``: for each matching module, a copy holding the file's tensors (popped from
    ``tensors``; keys ``base_model.model.<module>.<its state_dict key>``)."""
    copies = {}
    for path in find_modules_to_save(model, names):
        prefix = f"{PREFIX}{path}."
        state = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        copy = copy_of(model.get_submodule(path))
        try:
            copy.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RankwiseError(f"modules_to_save tensors of {path} do not fit the model's module "
                                f"({' '.join(str(e).split())[:300]})") from None
        copies[path] = copy
    return copies


def _bias_targets(model: nn.Module, tensors: dict[str, torch.Tensor], bias: str
                  ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(model bias, file tensor) pairs for PEFT's trained biases (``base_model.model.<module>[.base_layer].bias``)."""
    if tensors and bias == "none":
        raise RankwiseError(f"adapter file holds bias tensors (e.g. {sorted(tensors)[0]!r}) but its config says "
                            "bias='none' (truncated or mismatched file)")
    params = dict(model.named_parameters())
    pairs = []
    for key, value in sorted(tensors.items()):
        name = key.removeprefix(PREFIX)
        stem = name.removesuffix(".base_layer.bias").removesuffix(".bias")
        target = params.get(f"{stem}.bias", params.get(f"{stem}.base_layer.bias"))
        if target is None or target.shape != value.shape:
            raise RankwiseError(f"adapter tensor {key!r} (bias={bias!r}) is no bias of this model"
                                + ("" if target is None else f" (shape {list(value.shape)}, the model's is "
                                   f"{list(target.shape)})"))
        pairs.append((target, value))
    return pairs


def _exclude(exclude_modules: Any) -> list[str] | str | None:
    """PEFT's ``exclude_modules``: a list of names, or a string that is always a regex (fullmatch)."""
    if exclude_modules is None or exclude_modules == []:
        return None
    if isinstance(exclude_modules, str):
        return f"(?:{exclude_modules})"
    if isinstance(exclude_modules, list) and all(isinstance(e, str) for e in exclude_modules):
        return list(exclude_modules)
    raise RankwiseError(f"exclude_modules must be a list of names or a regex, got {exclude_modules!r}")


def load_targets(model: nn.Module, target_modules: Any, exclude: list[str] | str | None = None) -> set[str] | None:
    """The modules a config's ``target_modules`` (minus ``exclude``) selects in ``model`` (None when it has none)."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str) and target_modules != "all-linear":  # PEFT: a string is a regex
        try:
            re.compile(target_modules)
        except re.error as e:
            raise RankwiseError(f"target_modules {target_modules!r} is not a valid regex ({e})") from None
        target_modules = f"(?:{target_modules})"
    if isinstance(target_modules, (list, str)):
        return set(find_targets(model, target_modules, exclude))
    raise RankwiseError(f"target_modules must be a list of names or a regex, got {target_modules!r}")
