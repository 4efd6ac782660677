"""Memory planner: will a run fit, before it starts?

    p = rankwise.plan("llama-7b", "galore", rank=128, batch=1, seq=2048, dtype="bf16", budget="24GiB")
    print(p.table()); p.fits; p.largest_rank

Weights, gradients and optimizer state are *counted*, not estimated: the model is built on the ``meta`` device
(nothing allocated), the method prepares it and builds its optimizer exactly as the training loop does, every
trainable parameter gets a meta gradient (through a meta ``backward``, so layer-wise optimizers' gradient hooks run)
and the optimizer takes one real ``step()`` on meta tensors, so it creates
its state with its true shapes and dtypes. ``breakdown`` then counts bytes; the same function applied to a real model
after a real step (and ``held_gradient_bytes`` right after its backward) gives the measured numbers (``tests/plan`` checks they are equal for every registered method).

A method whose optimizer cannot step on ``meta`` tensors (e.g. one that reads tensor values with ``.item()``) may
define ``planned_state_bytes(model, optimizer) -> int`` on its ``Method``; the planner then uses it instead of the
meta step. No built-in method needs it.

Activations are an *estimate* (``activation_bytes``), documented in docs/plan.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import methods as methods_mod
from .errors import RankwiseError
from .methods import Method, OptimConfig
from .metrics import optimizer_state_bytes
from .models import PRESETS, llama_config

DTYPES = {"fp32": (torch.float32, 4), "bf16": (torch.bfloat16, 2), "amp": (torch.float32, 2)}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
GIB = 2**30


def parse_bytes(text: str | int | float) -> int:
    """``"24GB"`` (10^9), ``"24GiB"`` / ``"24G"`` (2^30), ``"512MiB"``, ``1e9`` -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise RankwiseError(f"cannot parse memory budget {text!r}; write e.g. 24GB (10^9 bytes), 24GiB or 24G "
                                "(2^30 bytes), 512MiB, or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).upper()
    if not value > 0 or not math.isfinite(value * _UNITS[unit]):
        raise RankwiseError(f"memory budget must be positive and finite, got {text!r}")
    return int(value * _UNITS[unit])


def _config(model: str, vocab_size: int | None):
    """A transformers config for a preset name or a folder / file holding a ``config.json``."""
    if model in PRESETS:
        return llama_config(model, vocab_size)
    if os.path.exists(model):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise RankwiseError(f"cannot read a transformers config from {model!r}: {e}") from None
    raise RankwiseError(f"unknown model {model!r}; valid presets: {', '.join(PRESETS)}; any transformers config "
                        "(a folder or a config.json file, e.g. a downloaded Hugging Face model) works too")


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(dtype)


def breakdown(model: nn.Module, optimizer: torch.optim.Optimizer, state_bytes: int | None = None) -> dict[str, int]:
    """Bytes of trainable / frozen weights (frozen includes buffers), gradients as held at their peak, optimizer state.

    Gradients: one per trainable parameter, in its dtype; with a layer-wise optimizer (``optimizer.layerwise``, which
    frees each gradient right after its update) only the largest one is alive at a time.
    """
    from .quant import tensor_bytes

    trainable = [p for p in model.parameters() if p.requires_grad]
    nbytes = [p.numel() * p.element_size() for p in trainable]
    frozen = sum(tensor_bytes(p) for p in model.parameters() if not p.requires_grad)  # quantized: real bytes
    frozen += sum(tensor_bytes(b) for b in model.buffers())
    layerwise = getattr(optimizer, "layerwise", False)
    return {
        "weights_trainable": sum(nbytes),
        "weights_frozen": frozen,
        "gradients": (max(nbytes, default=0) if layerwise else sum(nbytes)),
        "optimizer_state": optimizer_state_bytes(optimizer) if state_bytes is None else state_bytes,
    }


def _rows(n: int, world: int, rank: int) -> int:
    """Rows of ``n`` that rank ``rank`` holds under FSDP2 / DTensor ``Shard`` (``torch.chunk``: ceil(n / world) per
    rank, the last ones fewer or none)."""
    size = -(-n // world)
    return max(0, min(size, n - rank * size))


def _local_bytes(t: torch.Tensor, dim: int, world: int, rank: int) -> int:
    if t.dim() == 0 or t.shape[dim] == 0:
        return t.numel() * t.element_size()
    return t.numel() // t.shape[dim] * _rows(t.shape[dim], world, rank) * t.element_size()


def fsdp_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer, world: int, rank: int = 0) -> dict[str, int]:
    """``breakdown`` for one rank of FSDP2 (every parameter ``Shard(0)`` over ``world`` ranks; rank 0 holds the most).

    Weights and gradients: the rank's rows of each. Optimizer state, tensor by tensor, as it is placed
    (``rankwise.optim.sharded``): scalars and integer indices whole on every rank; with ``side="shard"`` the basis
    (n x r) whole (``basis="replicated"``) or by its rows (``basis="sharded"``) and the low-rank moments (r x m) by
    their columns (the weight's rows); everything else by rows, like the weights (``distributed.reshard_state``).
    The optimizer must have taken its step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    nbytes = [_local_bytes(p, 0, world, rank) for p in trainable]
    state = 0
    for group in optimizer.param_groups:
        shard = group.get("side") == "shard"
        whole_basis = shard and group.get("basis", "replicated") == "replicated"
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.dim() == 0 or not v.is_floating_point() or (whole_basis and key == "basis"):
                    state += v.numel() * v.element_size()
                elif shard and key == "basis":  # n x r, Shard(0)
                    state += _local_bytes(v, 0, world, rank)
                elif shard and p.dim() == 2 and v.dim() == 2 and v.shape[1] == p.shape[0] != v.shape[0]:
                    state += _local_bytes(v, 1, world, rank)
                else:
                    state += _local_bytes(v, 0, world, rank)
    frozen = sum(_local_bytes(p, 0, world, rank) for p in model.parameters() if not p.requires_grad)
    layerwise = getattr(optimizer, "layerwise", False)
    return {"weights_trainable": sum(nbytes), "weights_frozen": frozen + sum(b.numel() * b.element_size()
                                                                                for b in model.buffers()),
            "gradients": max(nbytes, default=0) if layerwise else sum(nbytes), "optimizer_state": state}


def held_gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients a real model holds now (measure right after ``backward``, before the step)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def _dims(config) -> dict[str, int]:
    def get(*names: str, default: int | None = None) -> int:
        for n in names:
            v = getattr(config, n, None)
            if v is not None:
                return int(v)
        if default is None:
            raise RankwiseError(f"the model config has none of {', '.join(names)}; the planner needs it to estimate "
                                "activations")
        return default

    h = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    return {"hidden": h, "layers": get("num_hidden_layers", "n_layer"), "heads": heads,
            "kv_hidden": h * get("num_key_value_heads", default=heads) // heads,
            "ffn": get("intermediate_size", "n_inner", "ffn_dim", default=4 * h), "vocab": get("vocab_size")}


def activation_bytes(config, batch: int, seq: int, element_size: int, checkpointing: bool = False) -> int:
    """Estimated bytes saved for backward by a pre-norm decoder (LLaMA-style, fused attention) — see docs/plan.md.

    Per token, per layer (element size e; h hidden, k key/value width, f FFN width, a heads):
        (9 h + 2 k + 4 f) e + 4 a + 8
    (two RMSNorms save input, normalized and output: 6h; q, k, v and the attention output: h + 2k + h; the output
    projection's input: h; SwiGLU: gate, up, SiLU(gate), product: 4f; the fused attention's log-sum-exp: 4a bytes;
    the norms' reciprocal RMS: 8 bytes). Head: the final norm (3h e), the logits (V e), their fp32 copy when e < 4
    and the log-softmax (V * 4 each). Activation checkpointing keeps each layer's input (h e per layer) plus one
    layer's activations while it is recomputed.
    """
    d = _dims(config)
    h, k, f, a, v = d["hidden"], d["kv_hidden"], d["ffn"], d["heads"], d["vocab"]
    tokens = batch * seq
    layer = tokens * ((9 * h + 2 * k + 4 * f) * element_size + 4 * a + 8)
    head = tokens * (3 * h * element_size + v * element_size + v * 4 * (2 if element_size < 4 else 1))
    embed = tokens * 8  # the token ids the embedding keeps
    if checkpointing:
        return d["layers"] * tokens * h * element_size + layer + head + embed
    return d["layers"] * layer + head + embed


@dataclass
class Plan:
    """Planned bytes of one run; ``total`` uses ``activations`` (no checkpointing) or the checkpointed estimate."""

    model: str
    method: str
    options: dict[str, Any]
    batch: int
    seq: int
    dtype: str
    checkpointing: bool
    trainable_params: int
    total_params: int
    bytes: dict[str, int]
    budget: int | None = None
    largest_rank: int | None = None
    notes: list[str] = field(default_factory=list)
    quantize: str | None = None
    world: int = 1  # > 1: the bytes are those of one rank (rank 0) of ``world`` processes under ``parallel``
    parallel: str = "ddp"
    period: int = 0  # the refresh period whose optimizer state is counted

    @property
    def total(self) -> int:
        b = self.bytes
        act = b["activations_checkpointed"] if self.checkpointing else b["activations"]
        return (b["weights_trainable"] + b["weights_frozen"] + b["gradients"] + b["optimizer_state"] + act
                + b.get("fsdp_gather", 0))

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def table(self) -> str:
        rows = [("weights (trainable)", self.bytes["weights_trainable"]),
                ("weights (frozen + buffers)", self.bytes["weights_frozen"]),
                ("gradients", self.bytes["gradients"]),
                ("optimizer state", self.bytes["optimizer_state"]),
                ("activations" + (" (checkpointed)" if self.checkpointing else ""),
                 self.bytes["activations_checkpointed" if self.checkpointing else "activations"]),
                *([("FSDP unit all-gathered", self.bytes["fsdp_gather"])] if "fsdp_gather" in self.bytes else []),
                ("total", self.total)]
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        base = f", {self.quantize} base" if self.quantize else ""
        lines = [f"{self.method}{f' ({opts})' if opts else ''} on {self.model}{base}: batch {self.batch} x seq "
                 f"{self.seq}, {self.dtype}, {self.trainable_params:,} of {self.total_params:,} params trainable"
                 + (f"; per rank of {self.world} ({self.parallel})" if self.world > 1 else "")
                 + (f"; state of period {self.period}" if self.period else ""),
                 f"{'':28}{'GiB':>10}{'bytes':>18}"]
        lines += [f"{name:28}{n / GIB:10.3f}{n:18,}" for name, n in rows]
        other = "activations_checkpointed" if not self.checkpointing else "activations"
        lines.append(f"({'with' if not self.checkpointing else 'without'} activation checkpointing the "
                     f"activations would be {self.bytes[other] / GIB:.3f} GiB)")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"budget {self.budget / GIB:.2f} GiB: {verdict} "
                         f"({(self.budget - self.total) / GIB:+.2f} GiB to spare)")
            if self.largest_rank is not None:
                lines.append(f"largest rank that fits: {self.largest_rank}")
        lines += self.notes
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _state_bytes(method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, period: int = 0) -> int:
    """The optimizer's state bytes after one step on meta tensors (or the method's own exact count). ``period`` > 0,
    for optimizers with refresh periods (``SplitOptimizer.enter_period``): after one step in each of the periods
    0..``period``, the state of that period (block selectors hold other blocks in each); other optimizers hold the
    same state in every period: one step."""
    hook = getattr(method, "planned_state_bytes", None)
    if hook is not None:
        return int(hook(model, optimizer))
    enter = getattr(optimizer, "enter_period", None)
    try:  # a backward on meta tensors sets every gradient and fires post-accumulate-grad (layer-wise) hooks
        for q in range(period + 1 if enter is not None else 1):
            if q:
                enter(q)
            torch.stack([p.sum() for p in model.parameters() if p.requires_grad]).sum().backward()
            optimizer.step()
    except Exception as e:  # noqa: BLE001 — any failure here means the method needs the override hook
        raise RankwiseError(f"method {method.name!r} cannot take an optimizer step on the meta device "
                            f"({type(e).__name__}: {e}); it must define planned_state_bytes(model, optimizer) "
                            "for the planner") from None
    return optimizer_state_bytes(optimizer)


def _plan_weights(config, method_name: str, options: dict[str, Any], dtype: str,
                  quantize: str | None = None, world: int = 1, parallel: str = "ddp",
                  period: int = 0) -> tuple[dict[str, int], int, int, Method]:
    method = methods_mod.get(method_name, **options)
    model = _meta_model(config, DTYPES[dtype][0])
    if method.calibration_batches:  # gradient-based inits see meta batches: only their shapes matter
        ids = torch.zeros(1, 9, dtype=torch.long, device="meta")
        method.calibrate(model, [ids] * method.calibration_batches)
    model = method.prepare(model)
    if quantize:
        from .quant import quantize_method_base

        model = quantize_method_base(model, method, quantize)
    optimizer = method.build_optimizer(model, OptimConfig())
    counts = breakdown(model, optimizer, _state_bytes(method, model, optimizer, period))
    if world > 1 and parallel == "fsdp":
        counts = fsdp_breakdown(model, optimizer, world)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts, trainable, sum(p.numel() for p in model.parameters()), method


def plan(model: str = "llama-7b", method: str = "full", rank: int | None = None, batch: int = 1, seq: int = 2048,
         dtype: str = "bf16", budget: str | int | None = None, checkpointing: bool = False,
         options: dict[str, Any] | None = None, vocab_size: int | None = None, quantize: str | None = None,
         world: int = 1, parallel: str = "ddp", period: int = 0) -> Plan:
    """Plan the memory of training ``model`` (a preset or a transformers config path) with ``method``.

    ``dtype``: ``bf16`` (weights, gradients, state and activations in bf16, as in GaLore's 7B setting), ``fp32``, or
    ``amp`` (fp32 weights, bf16 autocast activations: ``rankwise train --dtype bf16``). ``budget``: bytes or a string
    like ``24GB``; then ``fits`` answers and, for methods with a ``rank`` option, ``largest_rank`` is the largest rank
    whose plan fits (bisection: memory grows with rank). ``quantize``: ``nf4`` / ``int8`` frozen base (adapter
    methods; ``rankwise train --quantize``), counted in its real quantized bytes. ``world`` > 1: bytes of one rank
    (rank 0, the largest) of ``world`` processes; ``batch`` is the global batch, each rank runs ``batch / world``;
    ``parallel="ddp"`` replicates weights, gradients and state, ``"fsdp"`` shards them (``fsdp_breakdown``) and adds
    ``fsdp_gather``: one FSDP unit's full parameters (the largest), all-gathered for its forward / backward.
    ``period``: the refresh period whose optimizer state to count (``SplitOptimizer`` methods: block selectors such
    as FRUGAL, BAdam, LISA hold other blocks' moments in each period; other methods: the same state in every period;
    default 0, the first).
    """
    if dtype not in DTYPES:
        raise RankwiseError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value <= 0:
            raise RankwiseError(f"{name} must be a positive integer, got {value!r}")
    budget_bytes = None if budget is None else parse_bytes(budget)
    config = _config(model, vocab_size)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq > positions:
        raise RankwiseError(f"seq {seq} is longer than the model's {positions} positions; use --seq {positions} "
                            "or less")
    if parallel not in ("ddp", "fsdp"):
        raise RankwiseError(f"unknown parallel mode {parallel!r}; valid: ddp, fsdp")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise RankwiseError(f"world must be a positive integer (the number of processes), got {world!r}")
    if batch % world:
        raise RankwiseError(f"batch {batch} is not divisible by the world size {world}: every rank takes batch / "
                            f"world sequences; use a batch that is a multiple of {world}")
    if not isinstance(period, int) or isinstance(period, bool) or period < 0:
        raise RankwiseError(f"period must be a non-negative integer (0: the first refresh period), got {period!r}")
    options = dict(options or {})
    if rank is not None:
        options["rank"] = rank
    counts, trainable, total, built = _plan_weights(config, method, options, dtype, quantize, world, parallel, period)
    e = DTYPES[dtype][1]
    counts["activations"] = activation_bytes(config, batch // world, seq, e)
    counts["activations_checkpointed"] = activation_bytes(config, batch // world, seq, e, checkpointing=True)
    if world > 1 and parallel == "fsdp":
        d = _dims(config)
        h = d["hidden"]  # a LLaMA-style layer (2 norms, q k v o, gate up down) or the root (embedding, head, norm)
        layer = 2 * h + h * (2 * h + 2 * d["kv_hidden"]) + 3 * h * d["ffn"]
        root = 2 * d["vocab"] * h + h
        counts["fsdp_gather"] = max(layer, root) * (4 if dtype == "amp" else DTYPES[dtype][1])
    result = Plan(model, method, built.describe(), batch, seq, dtype, checkpointing, trainable, total, counts,
                  budget_bytes, quantize=quantize, world=world, parallel=parallel, period=period)
    if budget_bytes is not None and "rank" in methods_mod.info(method).options():
        result.largest_rank = _largest_rank(result, config, options)
        if result.largest_rank is None:
            result.notes.append("no rank fits the budget, not even 1")
    if budget_bytes is not None and not result.fits:
        result.notes += _switches(result, config, options)
    return result


def _switches(base: Plan, config, options: dict[str, Any]) -> list[str]:
    """What the switches that save memory (activation checkpointing, GaLore's layer-wise updates, 8-bit optimizer
    state) would make of a plan that does not fit: one line each, alone and together, with the total and whether it fits."""
    takes = methods_mod.info(base.method).options()
    same = (base.world, base.parallel, base.period)
    gather = base.bytes.get("fsdp_gather", 0)
    layerwise = None
    if "layerwise" in takes and not options.get("layerwise"):
        counts, _, _, _ = _plan_weights(config, base.method, {**options, "layerwise": True}, base.dtype, base.quantize,
                                       *same)
        layerwise = sum(counts.values()) + gather
    weights = sum(base.bytes[k] for k in ("weights_trainable", "weights_frozen", "gradients", "optimizer_state"))
    weights += gather
    act, act_ckpt = base.bytes["activations"], base.bytes["activations_checkpointed"]
    choices = []
    if not base.checkpointing:
        choices.append(("--checkpointing", weights + act_ckpt))
    if layerwise is not None:
        choices.append(("--opt layerwise=true", layerwise + (act_ckpt if base.checkpointing else act)))
        if not base.checkpointing:
            choices.append(("--checkpointing --opt layerwise=true", layerwise + act_ckpt))
    if "state_bits" in takes and not options.get("state_bits"):  # 8-bit optimizer state (rankwise.optim.lowbit)
        counts, _, _, _ = _plan_weights(config, base.method, {**options, "state_bits": 8}, base.dtype, base.quantize,
                                       *same)
        low = sum(counts.values()) + gather
        choices.append(("--opt state_bits=8", low + (act_ckpt if base.checkpointing else act)))
        if not base.checkpointing:
            choices.append(("--checkpointing --opt state_bits=8", low + act_ckpt))
    lines = [f"with {flags}: {total / GIB:.2f} GiB, {'fits' if total <= base.budget else 'does NOT fit'}"
             for flags, total in choices]
    return lines or ["no memory switch left to try (activation checkpointing is on, the method has no layer-wise "
                     "updates): lower --batch / --seq or the rank"]


def _largest_rank(base: Plan, config, options: dict[str, Any]) -> int | None:
    """The largest rank in [1, hidden size] whose plan fits the budget (None: not even rank 1).

    Weights, gradients and state are affine in the rank for every built-in method, so two plans give a candidate,
    checked exactly (it fits, the next rank does not); if the check fails, bisection (memory grows with rank).
    """
    static = (base.bytes["activations_checkpointed" if base.checkpointing else "activations"]
              + base.bytes.get("fsdp_gather", 0))
    cache: dict[int, int | None] = {}

    def need(r: int) -> int | None:
        if r not in cache:
            try:
                counts, _, _, _ = _plan_weights(config, base.method, {**options, "rank": r}, base.dtype, base.quantize,
                                               base.world, base.parallel, base.period)
                cache[r] = static + sum(counts.values())
            except RankwiseError:  # rank invalid for some matrix (larger than min(m, n))
                cache[r] = None
        return cache[r]

    def fits(r: int) -> bool:
        n = need(r)
        return n is not None and n <= base.budget

    top = _dims(config)["hidden"]
    if not fits(1):
        return None
    n1, n2 = need(1), need(2)
    if n2 is not None and n2 > n1:
        guess = max(1, min(top, 1 + (base.budget - n1) // (n2 - n1)))
        if fits(guess) and (guess == top or not fits(guess + 1)):
            return guess
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def compare(model: str = "llama-7b", rank: int | None = None, methods: list[str] | None = None,
            progress: bool = False, **kwargs: Any) -> list[Plan]:
    """``plan`` for every registered method (or ``methods``); ``rank`` goes to the methods that take one.
    ``target`` goes to the methods that take one (the adapters). ``progress``: show the methods planned so far and
    the ETA on stderr (``rankwise.progress``)."""
    from .progress import Progress

    names = methods or [m.name for m in methods_mod.available()
                        if not kwargs.get("quantize") or m.family in ("adapters", "moe")]  # a frozen base
    plans = []
    target = kwargs.pop("target", None)
    with Progress("plan --compare", len(names), unit="methods", bar=None if progress else False,
                  plain=progress) as bar:
        for name in names:
            takes_rank = "rank" in methods_mod.info(name).options()
            bar.describe(name)
            extra = {"target": target} if target is not None and "target" in methods_mod.info(name).options() else {}
            plans.append(plan(model, name, rank=rank if takes_rank else None,
                              **{**kwargs, "options": {**kwargs.get("options", {}), **extra}}))
            bar.finish(info=name)
    return plans


def compare_table(plans: list[Plan]) -> str:
    keys = ("weights_trainable", "weights_frozen", "gradients", "optimizer_state")
    head = f"{'method':14}{'weights':>10}{'frozen':>10}{'grads':>10}{'optim':>10}{'activ':>10}{'total':>10}  GiB"
    lines = [f"{plans[0].model}: batch {plans[0].batch} x seq {plans[0].seq}, {plans[0].dtype}", head]
    for p in plans:
        act = p.bytes["activations_checkpointed" if p.checkpointing else "activations"]
        cells = "".join(f"{p.bytes[k] / GIB:10.3f}" for k in keys)
        fit = "" if p.fits is None else ("  fits" if p.fits else "  too big")
        lines.append(f"{p.method:14}{cells}{act / GIB:10.3f}{p.total / GIB:10.3f}{fit}")
    return "\n".join(lines)


def bar_chart(plans: list[Plan], path: str | os.PathLike) -> None:
    """Stacked horizontal bars (weights, gradients, optimizer state, activations) per method, written atomically."""
    from .plots import plt, save_figure

    parts = [("weights", ("weights_trainable", "weights_frozen")), ("gradients", ("gradients",)),
             ("optimizer state", ("optimizer_state",))]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(plans) + 1.5))
    names = [p.method for p in plans]
    left = [0.0] * len(plans)
    for label, keys in [*parts, ("activations", ())]:
        widths = [(sum(p.bytes[k] for k in keys) if keys else
                   p.bytes["activations_checkpointed" if p.checkpointing else "activations"]) / GIB for p in plans]
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    if plans[0].budget is not None:
        ax.axvline(plans[0].budget / GIB, color="k", ls="--", lw=1, label="budget")
    ax.invert_yaxis()
    ax.set_xlabel("GiB")
    ax.set_title(f"{plans[0].model}, batch {plans[0].batch} x seq {plans[0].seq}, {plans[0].dtype}")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


__all__ = ["Plan", "activation_bytes", "bar_chart", "breakdown", "compare", "compare_table", "parse_bytes",
           "plan"]
