"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512; PEFT's ``peft/tuners/adalora``): an SVD-form update

    Delta W = (alpha / (r0 + 1e-5)) P diag(Lambda) Q        (PEFT: B (A * E) * scaling / ranknum)

with ``P = lora_B`` (out x r0), ``Lambda = lora_E`` (r0 x 1), ``Q = lora_A`` (r0 x in), ``r0 = init_r`` fixed (PEFT's
``ranknum``, not lowered when triplets are pruned), trained with the orthogonality regularizer (eq. 4)

    R(P, Q) = mean over the matrices of ||P^T P - I||_F and ||Q Q^T - I||_F,   loss += orth_reg_weight * R

and pruned by importance (eq. 5-11, ``RankAllocator``): per entry ``I = |w * grad|``, the sensitivity EMA
``Ibar = beta1 Ibar + (1 - beta1) I`` and uncertainty ``U = beta2 U + (1 - beta2) |I - Ibar|``, the element score
``s = Ibar * U``, and the score of triplet ``i``: ``s(Lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)``. The budget (total
kept triplets) follows the cubic schedule (eq. 12): ``b(t) = b0`` for ``t <= tinit``, then
``b_T + (b0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3`` (``T = total_step``), ``b_T = target_r x layers``
from ``T - tfinal`` on; every ``deltaT`` steps the triplets whose score is at most the ``(b0 - b(t))``-th smallest
have ``Lambda_i`` set to 0; at ``T - tfinal`` the final allocation is fixed and re-applied after every later step.

``AdaLoRAAllocator`` runs all of it in a post-step hook of the optimizer, so the loop needs no extra call: the
importance uses the gradients the step used (accumulated over micro-batches, all-reduced under DDP: every rank
computes the same scores and masks), and its EMAs live in the optimizer's state (counted by the planner, saved in
checkpoints). Files are PEFT's ``ADALORA`` format: the kept triplets only, ``rank_pattern`` holding each layer's
boolean mask of its ``init_r`` triplets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RankwiseError
from .base import Parameterization, parameterization
from .lora import refuse_unsupported

# AdaLoraConfig's fields (PEFT 0.21) that rankwise reads or that do not change the computation
ADALORA_FIELDS = frozenset(
    "alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path beta1 beta2 bias "
    "corda_config deltaT ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode "
    "init_lora_weights init_r kasa_config layer_replication layers_pattern layers_to_transform loftq_config "
    "lora_alpha lora_bias lora_dropout lora_ga_config megatron_config megatron_core modules_to_save "
    "monteclora_config orth_reg_weight peft_type peft_version qalora_group_size r rank_pattern revision "
    "runtime_config target_modules target_parameters target_r task_type tfinal tinit total_step "
    "trainable_token_indices use_bdlora use_dora use_qalora use_rslora velora_config".split())
_UNSUPPORTED = {"fan_in_fan_out": False, "layers_to_transform": None, "use_dora": False, "lora_bias": False,
                "trainable_token_indices": None, "layer_replication": None, "megatron_config": None,
                "target_parameters": None, "modules_to_save": None, "alpha_pattern": {}, "use_rslora": False,
                "use_qalora": False}
# the allocator's options (PEFT's names) and defaults
SCHEDULE = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5, "total_step": None}


def check_schedule(r: int, s: dict[str, Any]) -> None:
    """PEFT's checks of an AdaLoraConfig (config.py ``__post_init__``), as ``RankwiseError``."""
    total = s["total_step"]
    if not isinstance(total, int) or total <= 0:
        raise RankwiseError("adalora needs total_step, the number of optimizer steps of the run (e.g. "
                            "--opt total_step=STEPS, the run's --steps)")
    if not 0 < s["target_r"] <= r:
        raise RankwiseError(f"adalora target_r must be in [1, init r = {r}], got {s['target_r']}")
    if not (0 < s["beta1"] < 1 and 0 < s["beta2"] < 1):
        raise RankwiseError(f"adalora beta1 and beta2 must be in (0, 1), got {s['beta1']}, {s['beta2']}")
    if s["orth_reg_weight"] < 0 or s["tinit"] < 0 or s["tfinal"] < 0 or s["deltaT"] < 1:
        raise RankwiseError("adalora orth_reg_weight, tinit and tfinal must be >= 0 and deltaT >= 1")
    if s["tinit"] >= total - s["tfinal"]:
        raise RankwiseError(f"adalora schedule leaves no budgeting phase: tinit={s['tinit']} >= total_step - "
                            f"tfinal = {total - s['tfinal']}; lower tinit / tfinal or raise total_step")


@parameterization("adalora")
class AdaLoRA(Parameterization):
    peft_type = "ADALORA"

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, **schedule: Any):
        super().__init__(base, r, alpha, dropout, rslora, seed)
        if rslora:
            raise RankwiseError("adalora has no rsLoRA scaling (its scale is alpha / init_r)")
        unknown = sorted(set(schedule) - set(SCHEDULE))
        if unknown:
            raise RankwiseError(f"adalora does not take option(s) {', '.join(unknown)}; valid: {', '.join(SCHEDULE)}")
        self.schedule = {**SCHEDULE, **schedule}
        # PEFT: scaling = lora_alpha if lora_alpha > 0 else r, divided by ranknum (+1e-5) in the forward
        self.scaling, self.ranknum = (self.alpha if self.alpha > 0 else float(r)), float(r)
        w = base.weight
        g = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter((torch.randn(r, self.in_features, generator=g) * 0.02).to(w.device, w.dtype))
        self.lora_B = nn.Parameter((torch.randn(self.out_features, r, generator=g) * 0.02).to(w.device, w.dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=w.device, dtype=w.dtype))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device))  # kept triplets

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # PEFT's SVDLinear order of operations (its masks, thresholds and allocations then match bit for bit)
        return out + (self.drop(x) @ (self.lora_A * self.lora_E).t() @ self.lora_B.t()) * self.scaling / (
            self.ranknum + 1e-5)

    def orthogonality(self) -> list[torch.Tensor]:
        """``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` (the paper's eq. 4, PEFT's ``AdaLoraModel.forward``)."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return [torch.norm(self.lora_A @ self.lora_A.t() - eye, p="fro"),
                torch.norm(self.lora_B.t() @ self.lora_B - eye, p="fro")]

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Keep the triplets ``keep`` (bool, r): the others' singular values are set to 0 (PEFT's masking)."""
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def export_state(self) -> dict[str, torch.Tensor]:
        """PEFT's ADALORA layout: only the kept triplets (``rank_pattern`` in the config says which)."""
        k = self.rank_mask
        return {"lora_A": self.lora_A.detach()[k], "lora_B": self.lora_B.detach()[:, k],
                "lora_E": self.lora_E.detach()[k]}

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (self.r, self.in_features), "lora_B": (self.out_features, self.r), "lora_E": (self.r, 1),
                "rank_mask": (self.r,)}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """``tensors`` as ``file_layers`` expands them: every ``init_r`` triplet (pruned ones zero) and the mask."""
        with torch.no_grad():
            for key in ("lora_A", "lora_B", "lora_E"):
                getattr(self, key).copy_(tensors[key])
            self.rank_mask.copy_(tensors["rank_mask"].bool())

    @classmethod
    def file_layers(cls, config: dict[str, Any], grouped: dict[str, dict[str, torch.Tensor]]
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """A file's kept triplets placed at the positions its ``rank_pattern`` marks among ``init_r`` (the pruned
        ones zero), plus the mask, per layer (PEFT's ``resize_modules_by_rank_pattern``, the other way)."""
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            raise RankwiseError(f"ADALORA rank_pattern must map '<module>.lora_E' to lists of booleans, got "
                                f"{type(pattern).__name__}")
        r = int(config["init_r"])
        unknown = sorted(k for k in pattern if k.removesuffix(".lora_E") not in grouped)
        if unknown:
            raise RankwiseError(f"ADALORA rank_pattern key {unknown[0]!r} names no adapted module of the file "
                                f"(keys are '<module>.lora_E', e.g. {next(iter(grouped))}.lora_E)")
        out = {}
        for path, tensors in grouped.items():
            keep = pattern.get(f"{path}.lora_E")
            if keep is None:
                keep = [True] * r
            if not isinstance(keep, list) or len(keep) != r or not all(isinstance(b, bool) for b in keep):
                raise RankwiseError(f"ADALORA rank_pattern of {path} must be a list of init_r = {r} booleans")
            mask = torch.tensor(keep, dtype=torch.bool)
            kept = int(mask.sum())
            full = dict(tensors)
            for key, rows in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                t = tensors.get(key)
                if t is None or t.dim() != 2 or t.shape[rows] != kept:
                    raise RankwiseError(f"adapter tensor {path}.{key} has shape "
                                        f"{None if t is None else list(t.shape)}, but rank_pattern keeps {kept} of "
                                        f"{r} triplets there (truncated or mismatched file)")
                shape = list(t.shape)
                shape[rows] = r
                full[key] = t.new_zeros(shape)
                if rows:
                    full[key][:, mask] = t
                else:
                    full[key][mask] = t
            full["rank_mask"] = mask.to(tensors["lora_A"].dtype)
            out[path] = full
        return out

    @classmethod
    def peft_fields(cls, adapters: dict[str, "AdaLoRA"]) -> dict[str, Any]:
        first = next(iter(adapters.values()))
        pruned = any(not bool(a.rank_mask.all()) for a in adapters.values())
        pattern = {f"{p}.lora_E": a.rank_mask.tolist() for p, a in adapters.items()} if pruned else None
        return {"r": 8, "init_r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
                "init_lora_weights": True, "use_rslora": False, "use_dora": False, "rank_pattern": pattern,
                **first.schedule}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(config) - ADALORA_FIELDS)
        if unknown:
            raise RankwiseError(f"this ADALORA adapter config has unknown field(s) {', '.join(unknown)} (not in "
                                "PEFT 0.21's AdaLoraConfig); remove them or save the adapter with PEFT")
        refuse_unsupported(config, _UNSUPPORTED)
        if config.get("bias", "none") != "none":
            raise RankwiseError(f"this ADALORA adapter sets bias={config['bias']!r}; rankwise's AdaLoRA supports "
                                "bias='none'")
        try:
            options = {"r": int(config["init_r"]), "alpha": float(config.get("lora_alpha", 8)),
                       "dropout": float(config.get("lora_dropout", 0.0))}
            options.update({k: type(v)(config[k]) if v is not None else config[k]
                            for k, v in SCHEDULE.items() if config.get(k) is not None})
        except (KeyError, TypeError, ValueError) as e:
            raise RankwiseError(f"ADALORA adapter config lacks a valid {e} (init_r is required)") from None
        return options


class AdaLoRAAllocator:
    """The budget schedule and importance-based masking of every AdaLoRA layer of a model (PEFT's
    ``RankAllocator`` + ``update_and_allocate``), run by a post-step hook of the optimizer.

    ``step`` counts optimizer steps (1-based: PEFT's ``global_step`` of ``update_and_allocate``); the training
    loop's ``after_step`` sets it to the loop's step. Sensitivity / uncertainty EMAs are kept in
    ``optimizer.state[p]`` under ``adalora_ipt`` / ``adalora_unc``.
    """

    def __init__(self, layers: list[AdaLoRA], schedule: dict[str, Any]):
        self.layers, self.s = layers, schedule
        self.step = 0
        self.init_budget = sum(layer.r for layer in layers)
        self.target_budget = schedule["target_r"] * len(layers)
        self.params = [p for layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_E)]

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask) at ``step`` (PEFT's ``budget_schedule``)."""
        s, total = self.s, self.s["total_step"]
        if step <= s["tinit"]:
            return self.init_budget, False
        if step > total - s["tfinal"]:
            return self.target_budget, True
        coeff = 1 - (step - s["tinit"]) / (total - s["tfinal"] - s["tinit"])
        return int((self.init_budget - self.target_budget) * (coeff ** 3) + self.target_budget), \
            step % s["deltaT"] == 0

    @torch.no_grad()
    def update_importance(self, optimizer: torch.optim.Optimizer) -> None:
        """``Ibar``, ``U`` from ``|w * grad|`` of every AdaLoRA tensor (foreach over all of them)."""
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        b1, b2 = self.s["beta1"], self.s["beta2"]
        ipt = torch._foreach_abs(torch._foreach_mul(params, [p.grad for p in params]))
        states = [optimizer.state[p] for p in params]
        for st, t in zip(states, ipt):
            if "adalora_ipt" not in st:
                st["adalora_ipt"], st["adalora_unc"] = torch.zeros_like(t), torch.zeros_like(t)
        avg = [st["adalora_ipt"] for st in states]
        unc = [st["adalora_unc"] for st in states]
        new_avg = torch._foreach_add(torch._foreach_mul(avg, b1), torch._foreach_mul(ipt, 1 - b1))
        dev = torch._foreach_abs(torch._foreach_sub(ipt, new_avg))
        new_unc = torch._foreach_add(torch._foreach_mul(unc, b2), torch._foreach_mul(dev, 1 - b2))
        torch._foreach_copy_(avg, new_avg)
        torch._foreach_copy_(unc, new_unc)

    def reset_importance(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.params:
            optimizer.state[p].pop("adalora_ipt", None)
            optimizer.state[p].pop("adalora_unc", None)

    @torch.no_grad()
    def mask_to_budget(self, optimizer: torch.optim.Optimizer, budget: int) -> None:
        """Keep the ``budget`` most important triplets over all layers (ties at the threshold pruned, as PEFT)."""
        def score(p: torch.Tensor) -> torch.Tensor:
            st = optimizer.state[p]
            return st["adalora_ipt"] * st["adalora_unc"]

        scores = [score(layer.lora_E).view(-1) + (score(layer.lora_A).mean(dim=1) + score(layer.lora_B).mean(dim=0))
                  for layer in self.layers]
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else -float("inf")
        for layer, sc in zip(self.layers, scores):
            layer.apply_mask(~(sc <= threshold))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """PEFT's ``update_and_allocate(step)`` for the step just taken."""
        self.step += 1
        if self.params[0].is_meta:  # the planner's step on meta tensors: state is created, nothing is masked
            self.update_importance(optimizer)
            return
        if self.s["total_step"] is None:
            raise RankwiseError("adalora needs total_step (its budget schedule's length): pass total_step=N, or "
                                "train with rankwise.train, which sets it to the run's steps")
        step, final = self.step, self.s["total_step"] - self.s["tfinal"]
        if step < final:
            self.update_importance(optimizer)
            budget, mask = self.budget(step)
            if mask:
                self.mask_to_budget(optimizer, budget)
        elif step == final:
            self.mask_to_budget(optimizer, self.budget(step)[0])
            self.reset_importance(optimizer)
        else:
            for layer in self.layers:
                layer.apply_mask(layer.rank_mask.clone())

    def orthogonal_regularizer(self) -> torch.Tensor:
        norms = [n for layer in self.layers for n in layer.orthogonality()]
        return self.s["orth_reg_weight"] * torch.stack(norms).sum() / len(norms)
