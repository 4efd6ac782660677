"""Injection and adapter management on any ``nn.Module`` (transformers models unchanged).

    model = apply(model, method="lora", r=8, alpha=16, target=["q_proj", "v_proj"])
    with disable_adapters(model): base_logits = model(x).logits
    merge(model); unmerge(model); set_adapter(model, "other")

Targets: a list of names (a module matches when its full name equals one or ends with ``"." + name``, PEFT's rule),
a comma-separated string of names, a regex (``re.fullmatch`` on the full module name), or ``"all-linear"`` (every
``nn.Linear`` and GPT-2 ``Conv1D`` except the output layer; PEFT's rule). ``exclude`` (PEFT's ``exclude_modules``) takes the same forms and removes
modules from the targets.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Iterator, Sequence

from torch import nn

from ..errors import RankwiseError
from .base import PARAMETERIZATIONS, AdapterLinear, LinearView, Parameterization, as_linear, is_conv1d, layer_seed

Target = str | Sequence[str]
BIAS_MODES = ("none", "all", "lora_only")
_NAME_LIST = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


class ModuleCopy(nn.Module):
    """PEFT's ``modules_to_save``: any module kept as ``original_module`` (frozen) plus one trained full copy per
    adapter (``copies[name]``). The first active adapter with a copy runs it; otherwise, or when adapters are
    disabled, the original runs. Attributes (``weight``, ...) resolve to the module in use."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def in_use(self) -> nn.Module:
        modules = self.__dict__["_modules"]
        if self.__dict__["disabled"] or not self.__dict__["active"]:
            return modules["original_module"]
        return modules["copies"][self.__dict__["active"][0]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.in_use(), name)


def module_copies(model: nn.Module) -> dict[str, ModuleCopy]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModuleCopy)}


def find_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Modules whose full name ends with one of ``names`` (PEFT's ``_set_trainable`` rule: a plain suffix), not
    inside an adapter layer or another match; a clear error if one name matches nothing."""
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise RankwiseError(f"modules_to_save must be a list of module names, got {names!r}")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, (AdapterLinear, ModuleCopy))]
    found: list[str] = []
    for n, _ in model.named_modules():
        inside = any(n.startswith(w + ".") for w in wrapped + found)
        if n and not inside and any(n.endswith(k) for k in names):
            found.append(n)
    for k in names:
        if not any(n.endswith(k) for n in found):
            raise RankwiseError(f"modules_to_save entry {k!r} matches no module of {type(model).__name__} "
                                "(PEFT's rule: the end of a module's full name, e.g. 'lm_head')")
    return found


def _output_layer_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def _linear_names(model: nn.Module) -> list[str]:
    """Names of every plain ``nn.Linear`` or ``Conv1D`` and every ``AdapterLinear`` (not the layer inside one)."""
    wrapped = {f"{n}.base_layer" for n in adapter_layers(model)}
    copies = tuple(f"{n}." for n in module_copies(model))
    return [n for n, m in model.named_modules()
            if (isinstance(m, AdapterLinear) or type(m) is nn.Linear or is_conv1d(m)) and n not in wrapped
            and not n.startswith(copies)]


def _matches(name: str, target: Target) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def normalize_target(target: Target) -> Target:
    """A comma-separated string of plain names becomes a list; other strings are regexes (or ``all-linear``)."""
    if isinstance(target, str):
        if target == "all-linear":
            return target
        if _NAME_LIST.fullmatch(target) and "." not in target:
            return [t.strip() for t in target.split(",")]
        try:
            re.compile(target)
        except re.error as e:
            raise RankwiseError(f"target {target!r} is neither a list of module names nor a valid regex ({e})") from None
        return target
    if not target or not all(isinstance(t, str) and t for t in target):
        raise RankwiseError(f"target must be a non-empty list of module names, a regex or 'all-linear', got {target!r}")
    return list(target)


def find_targets(model: nn.Module, target: Target, exclude: Target | None = None) -> list[str]:
    """Full names of the linear layers ``target`` selects minus those ``exclude`` selects (model order); a clear
    error listing candidates if none."""
    target = normalize_target(target)
    names = _linear_names(model)
    if target == "all-linear":
        outputs = _output_layer_names(model)
        found = [n for n in names if n not in outputs]
    else:
        found = [n for n in names if _matches(n, target)]
    if exclude is not None:
        exclude = normalize_target(exclude)
        found = [n for n in found if not _matches(n, exclude)]
    if not found:
        candidates = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise RankwiseError(f"target {target!r} matches no linear layer of {type(model).__name__}; candidate module "
                            f"names: {', '.join(candidates) or 'none (the model has no nn.Linear or Conv1D)'} "
                            "(or a regex on full names, or 'all-linear')" +
                            (f", once exclude={exclude!r} is applied" if exclude is not None else ""))
    return found


def method_class(method: str) -> type[Parameterization]:
    if method not in PARAMETERIZATIONS:
        raise RankwiseError(f"unknown adapter method {method!r}; valid: {', '.join(sorted(PARAMETERIZATIONS))}")
    return PARAMETERIZATIONS[method]


def pattern_value(patterns: dict[str, Any], path: str) -> Any | None:
    r"""PEFT's per-module override rule (peft/utils/other.py ``get_pattern_key``): the value of the first key ``k``
    with ``re.match(rf"(.*\.)?({k})$", path)``, else None."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", path)), None)


def check_patterns(options: dict[str, Any], paths: list[str]) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key must select at least one target."""
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = options.get(field) or {}
        if not isinstance(patterns, dict):
            raise RankwiseError(f"{field} must map module names (or regexes) to values, got {patterns!r}")
        for k in patterns:
            if not any(pattern_value({k: 1}, p) is not None for p in paths):
                raise RankwiseError(f"{field} key {k!r} matches none of the {len(paths)} target modules "
                                    f"(e.g. {paths[0]}); use a module name, a suffix such as 'k_proj', or a regex")


# LoRA-style factors B (m, r) A (r, n): a rank above min(m, n) adds parameters, not expressiveness. (VeRA / NOLA /
# RandLoRA draw r random frozen bases and may use more of them; the MoE adapters split r over experts.)
RANK_AT_MOST_MIN_DIM = ("lora", "lora-xs")


def build_parameterization(method: str, base: nn.Linear | LinearView, options: dict[str, Any],
                           path: str) -> Parameterization:
    """``PARAMETERIZATIONS[method]`` for the linear ``base`` at ``path`` (a ``Conv1D`` through ``as_linear``); ``options["seed"]`` is the global seed;
    ``options["rank_pattern"]`` / ``["alpha_pattern"]`` (PEFT's) override ``r`` / ``alpha`` per module."""
    method_class(method)
    kwargs = {k: v for k, v in options.items() if k not in ("rank_pattern", "alpha_pattern")}
    for field, key in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        value = pattern_value(options.get(field) or {}, path)
        if value is not None:
            kwargs[key] = value
    r, limit = kwargs.get("r"), min(base.in_features, base.out_features)
    if method in RANK_AT_MOST_MIN_DIM and isinstance(r, int) and r > limit:
        raise RankwiseError(f"{method} rank {r} is larger than min(m, n) = {limit} of {path} "
                            f"({base.out_features}x{base.in_features}): B A then has rank at most {limit} while its "
                            f"parameters grow with r; use --rank {limit} or less")
    kwargs["seed"] = layer_seed(options.get("seed", 0), path)
    try:
        param = PARAMETERIZATIONS[method](base, **kwargs)
    except TypeError as e:
        raise RankwiseError(f"bad option for adapter method {method!r}: {e}") from None
    param.options = dict(options)
    return param


def attach(model: nn.Module, name: str, modules: dict[str, Parameterization],
           copies: dict[str, nn.Module] | None = None) -> None:
    """Wrap each target (full name -> parameterization) in an ``AdapterLinear`` and each ``copies`` module (full name
    -> trained copy, ``modules_to_save``) in a ``ModuleCopy``, and add adapter ``name``."""
    for path, copy in (copies or {}).items():
        module = model.get_submodule(path)
        if not isinstance(module, ModuleCopy):
            module = ModuleCopy(module)
            model.set_submodule(path, module)
        module.copies[name] = copy
    for path, param in modules.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, AdapterLinear):
            layer = AdapterLinear(layer)
            model.set_submodule(path, layer)
        layer.adapters[name] = param
        param.prepare_base(layer.linear)
    set_adapter(model, name)


def apply(model: nn.Module, method: str = "lora", r: int = 8, alpha: float = 16.0,
          target: Target = ("q_proj", "v_proj"), dropout: float = 0.0, adapter_name: str = "default",
          seed: int = 0, exclude: Target | None = None, bias: str = "none",
          modules_to_save: Sequence[str] | None = None, **options: Any) -> nn.Module:
    """Wrap the target linears of ``model`` (minus ``exclude``) in place with adapter ``adapter_name`` of ``method``,
    freeze everything else, make the new adapter the active and only trainable one; return ``model``.

    ``options`` go to the parameterization (e.g. ``rslora=True``, ``init="gaussian"``, ``num_bases=64``).
    Each layer's random tensors come from ``layer_seed(seed, name)`` (or the shared seed), so they can be rebuilt.
    ``bias`` (PEFT's, LoRA only): ``"all"`` also trains every bias of the model in place, ``"lora_only"`` the biases
    of the adapted layers; they are saved with the adapter (and, as in PEFT, not undone by disabling it).
    ``modules_to_save`` (PEFT's): modules (any type, e.g. ``["lm_head"]``) trained as full copies of their own,
    used while the adapter is active and saved with it.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise RankwiseError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    existing = {n for layer in adapter_layers(model).values() for n in layer.adapters}
    if adapter_name in existing:
        raise RankwiseError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name "
                            f"(existing: {', '.join(sorted(existing))}) or delete_adapter it first")
    if bias not in BIAS_MODES:
        raise RankwiseError(f"bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}")
    if bias != "none" and method_class(method).peft_type != "LORA":
        raise RankwiseError(f"bias={bias!r} (trained biases) is supported for LoRA adapters only, not {method!r}")
    paths = find_targets(model, target, exclude)
    saved = find_modules_to_save(model, modules_to_save) if modules_to_save else []
    overlap = [p for p in paths if any(p == s or p.startswith(s + ".") for s in saved)]
    if overlap:
        raise RankwiseError(f"{overlap[0]} is both an adapter target and in modules_to_save; exclude it from one")
    bases = {p: base_linear(model, p) for p in paths}
    options = dict(r=r, alpha=alpha, dropout=dropout, seed=seed, **options)
    check_patterns(options, paths)
    options.update(method_class(method).model_options(list(bases.values()), options))
    modules = {}
    for path, base in bases.items():
        modules[path] = build_parameterization(method, base, options, path)
        modules[path].exclude = None if exclude is None else normalize_target(exclude)
        modules[path].train_bias = bias
        modules[path].modules_to_save = list(modules_to_save) if modules_to_save else None
    attach(model, adapter_name, modules, {p: copy_of(model.get_submodule(p)) for p in saved})
    return model


def copy_of(module: nn.Module) -> nn.Module:
    """A trainable deep copy of the original module (of the module itself when it is not wrapped yet)."""
    original = module.original_module if isinstance(module, ModuleCopy) else module
    return copy.deepcopy(original).requires_grad_(True)


def base_linear(model: nn.Module, path: str) -> nn.Linear | LinearView:
    """The (base) layer at ``path`` in the ``nn.Linear`` convention."""
    layer = model.get_submodule(path)
    return as_linear(layer.base_layer if isinstance(layer, AdapterLinear) else layer)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters; they (and nothing else in the model) become trainable."""
    names = [names] if isinstance(names, str) else list(names)
    layers = adapter_layers(model)
    known = {n for layer in layers.values() for n in layer.adapters} | {
        n for wrapper in module_copies(model).values() for n in wrapper.copies}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RankwiseError(f"no adapter named {', '.join(map(repr, unknown))}; the model has: "
                            f"{', '.join(sorted(known)) or 'none (use adapters.apply first)'}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.active = [n for n in names if n in layer.adapters]
        for n in layer.active:
            for p in layer.adapters[n].parameters():
                p.requires_grad_(True)
    for wrapper in module_copies(model).values():
        wrapper.active = [n for n in names if n in wrapper.copies]
        for n in wrapper.active:
            wrapper.copies[n].requires_grad_(True)
    for p in trained_biases(model, names).values():
        p.requires_grad_(True)


def trained_biases(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Biases the adapters ``names`` train (PEFT's ``bias``): every ``*.bias`` of the model outside adapters for
    ``"all"``, the adapted layers' ``base_layer.bias`` for ``"lora_only"``; keyed by parameter name."""
    layers = adapter_layers(model)
    modes = {layer.adapters[n].train_bias for layer in layers.values() for n in names if n in layer.adapters}
    found = {}
    if "all" in modes:
        found.update({k: p for k, p in model.named_parameters()
                      if (k == "bias" or k.endswith(".bias")) and ".adapters." not in k})
    if "lora_only" in modes:
        found.update({f"{path}.base_layer.bias": layer.base_layer.bias for path, layer in layers.items()
                      if layer.base_layer.bias is not None and any(
                          layer.adapters[n].train_bias == "lora_only" for n in names if n in layer.adapters)})
    return found


def active_parameterizations(model: nn.Module) -> dict[str, Parameterization]:
    """``"{module}.{adapter}"`` -> parameterization, for the active adapters."""
    return {f"{path}.{n}": layer.adapters[n] for path, layer in adapter_layers(model).items() for n in layer.active}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is the base model (merged adapters are unmerged for the duration)."""
    layers = adapter_layers(model).values()
    wrappers = module_copies(model).values()
    merged = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        for n in reversed(merged[id(layer)]):
            layer.unmerge(n)
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper in wrappers:
            wrapper.disabled = False
        for layer in layers:
            layer.disabled = False
            for n in merged[id(layer)]:
                layer.merge(n)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights; the outputs do not change."""
    for layer in adapter_layers(model).values():
        for n in _select(layer, names):
            layer.merge(n)


def unmerge(model: nn.Module) -> None:
    """Undo every merge (in reverse order)."""
    for layer in adapter_layers(model).values():
        for n in reversed(list(layer.merged)):
            layer.unmerge(n)


def _select(layer: AdapterLinear, names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return list(layer.active)
    names = [names] if isinstance(names, str) else list(names)
    return [n for n in names if n in layer.adapters]


def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Merge (default: the active adapters) and put the plain base layers back; returns ``model``."""
    merge(model, names)
    for path, layer in adapter_layers(model).items():
        model.set_submodule(path, layer.base_layer)
    for path, wrapper in module_copies(model).items():  # modules_to_save: the copy in use replaces the module
        model.set_submodule(path, wrapper.in_use())
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    layers = adapter_layers(model)
    if not any(name in layer.adapters for layer in layers.values()):
        raise RankwiseError(f"no adapter named {name!r} to delete")
    for wrapper in module_copies(model).values():
        if name in wrapper.copies:
            del wrapper.copies[name]
            wrapper.active = [n for n in wrapper.active if n != name]
    for layer in layers.values():
        if name in layer.adapters:
            layer.unmerge(name)
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
