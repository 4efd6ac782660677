"""SwitchLoRA step for step against an independent oracle of the reference's switching loop.

Reference: github.com/asfsdsf/SwitchLoRA @ 393e21419cce9f78fc70b277dd4ec78e37e8ff99, ``switchlora/switch_lora.py``
(continuous switching, the default: ``switch`` -> ``_get_switch_replace_num`` / ``_select_indices`` /
``_switch_chosen_indices``, then ``zero_lora_states`` and ``correct_switched_lora``, called before
``optimizer.step()`` in ``llama/main.py``) and ``switchlora/optimizer.py`` (``StepAdamW``: one step counter per row
of A / column of B). The oracle below keeps the reference's Python lists (selected slots, fixed steps, pointers),
switches one index at a time with rank-1 corrections of ``W``, and runs Adam row by row; only the per-layer
uniform draws are shared with rankwise (the same seeded generator). Model: ref_model's tiny LLaMA (square q/o,
rectangular k/v/gate/up/down), 36 steps, several switches per layer.
"""

from __future__ import annotations

import copy
import torch
from ref_model import TOL, batches, loss_of, tiny_llama
from torch import nn

from rankwise import methods
from rankwise.methods import OptimConfig
from rankwise.reparam.switchlora import SwitchLoRALinear

RANK, INTERVAL, DESCENT, WARM, LR, WD, STEPS, SEED = 8, 6.0, 12, 2, 1e-3, 0.01, 36, 0


class OracleLayer:
    """The reference's SwitchLoraLinear state, as plain tensors and Python lists."""

    def __init__(self, ours: SwitchLoRALinear):
        r = RANK
        self.W = ours.weight.detach().clone()
        self.A = ours.lora_A.detach().clone().requires_grad_()
        self.B = ours.lora_B.detach().clone().requires_grad_()
        self.cand_A = ours.candidates_A.clone()
        self.cand_B = ours.candidates_B.clone()
        self.C = min(ours.in_features, ours.out_features)
        self.sel_A = list(range(self.C - r, self.C))  # _init_orthogonal_lora, continuous
        self.sel_B = [self.sel_A[i - r // 2] for i in range(r)]  # shifted so that A and B switch apart
        self.fixed_A, self.fixed_B = [0] * r, [0] * r
        self.ptr_A, self.ptr_B = 0, r // 2
        self.scaling = 1.0 / r  # lora_alpha = 1
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W.t() + self.scaling * (x @ self.A.t() @ self.B.t())

    @torch.no_grad()
    def switch(self, step: int, u: float) -> None:
        r = RANK
        rate = max((0.3 ** (1 / DESCENT)) ** (step + 1), 1e-8)
        replace = r / (INTERVAL / rate)
        replace = int(replace) + (1 if u < replace - int(replace) else 0)
        fa, fb = sum(s > 0 for s in self.fixed_A), sum(s > 0 for s in self.fixed_B)
        replace = min(replace, (self.ptr_A - fa - self.ptr_B) % r, (self.ptr_B - fb - self.ptr_A) % r)
        if replace == 0:
            return
        rows = [i % r for i in range(self.ptr_A, self.ptr_A + replace)]
        cols = [i % r for i in range(self.ptr_B, self.ptr_B + replace)]
        self.ptr_A, self.ptr_B = (self.ptr_A + replace) % r, (self.ptr_B + replace) % r
        start = self.sel_A[rows[0] - 1] + 1
        for n, i in enumerate(rows):
            dest = (start + n) % self.C
            cand = self.cand_A[dest].clone()
            self.W += self.scaling * torch.outer(self.B[:, i], self.A[i] - cand)
            self.cand_A[self.sel_A[i]] = self.A[i]
            self.A[i] = cand
            self.sel_A[i] = dest
            self.fixed_B[i] = WARM
        start = self.sel_B[cols[0] - 1] + 1
        for n, j in enumerate(cols):
            dest = (start + n) % self.C
            cand = self.cand_B[dest].clone()
            self.W += self.scaling * torch.outer(self.B[:, j] - cand, self.A[j])
            self.cand_B[self.sel_B[j]] = self.B[:, j]
            self.B[:, j] = cand
            self.sel_B[j] = dest
            self.fixed_A[j] = WARM

    @torch.no_grad()
    def zero_states_and_grads(self) -> None:
        for name, fixed, mat in (("A", self.fixed_A, self.A), ("B", self.fixed_B, self.B)):
            state = self.state.get(name)
            for i, s in enumerate(fixed):
                view = (lambda t: t[i]) if name == "A" else (lambda t: t[:, i])
                if s == WARM and state is not None:
                    for key in ("exp_avg", "exp_avg_sq", "step"):
                        view(state[key]).zero_()
                if s > 0:
                    view(mat.grad).zero_()
                    fixed[i] -= 1

    @torch.no_grad()
    def adam(self, lr: float) -> None:
        """StepAdamW on A (a step per row) and B (a step per column): the bias corrections broadcast per slice."""
        b1, b2, eps = 0.9, 0.999, 1e-8
        for name, mat in (("A", self.A), ("B", self.B)):
            state = self.state.setdefault(name, {
                "step": torch.zeros((RANK, 1) if name == "A" else (1, RANK)),
                "exp_avg": torch.zeros_like(mat), "exp_avg_sq": torch.zeros_like(mat)})
            mat.mul_(1 - lr * WD)
            t = state["step"].add_(1)
            g = mat.grad
            m = state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            v = state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            mat.sub_(lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t).sqrt() + eps))


class OracleModule(nn.Module):
    def __init__(self, layer: OracleLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward(x)


def test_switchlora_step_for_step_against_the_reference_loop():
    base = tiny_llama(SEED)
    dense = copy.deepcopy(base)
    method = methods.get("switchlora", rank=RANK, interval=INTERVAL, descent_steps=DESCENT, frozen_steps=WARM,
                         seed=SEED)
    torch.manual_seed(1)
    ours = method.prepare(copy.deepcopy(base))
    layers = [m for m in ours.modules() if isinstance(m, SwitchLoRALinear)]
    assert len(layers) == 14
    ref = copy.deepcopy(ours)
    names = [n for n, m in ours.named_modules() if isinstance(m, SwitchLoRALinear)]
    oracles = [OracleLayer(m) for m in layers]
    for name, oracle, layer in zip(names, oracles, layers):
        ref.set_submodule(name, OracleModule(oracle))
        assert layer.selected_A.tolist() == oracle.sel_A and layer.selected_B.tolist() == oracle.sel_B
        w0 = dense.get_submodule(name).weight
        assert (layer.dense_weight() - w0).abs().max() <= 1e-6  # the layer starts as the dense init
    others = [p for p in ref.parameters() if p.requires_grad]
    ref_adam = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": WD},
                                  {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}], lr=LR)
    opt = method.build_optimizer(ours, OptimConfig(lr=LR, weight_decay=WD))
    start = [layer.dense_weight().detach().clone() for layer in layers]
    draws = torch.Generator().manual_seed(SEED)
    trace, switched = [], 0
    for step, batch in enumerate(batches(STEPS), start=1):
        opt.zero_grad(set_to_none=True)
        loss_of(ours, batch).backward()
        opt.step()
        method.after_step(step, ours, opt)

        ref_adam.zero_grad(set_to_none=True)
        for o in oracles:
            o.A.grad = o.B.grad = None
        loss_of(ref, batch).backward()
        us = torch.rand(len(oracles), generator=draws, dtype=torch.float64).tolist()
        before = [list(o.sel_A) for o in oracles]
        for o, u in zip(oracles, us):  # switch_lora(model, optimizer, update_step, ...)
            o.switch(step - 1, u)
            o.zero_states_and_grads()
        switched += sum(a != b for o, sel in zip(oracles, before) for a, b in zip(o.sel_A, sel))
        for o in oracles:
            o.adam(LR)
        ref_adam.step()

        diffs = [(layer.weight - o.W).abs().max().item() for layer, o in zip(layers, oracles)]
        diffs += [(layer.lora_A - o.A).abs().max().item() for layer, o in zip(layers, oracles)]
        diffs += [(layer.lora_B - o.B).abs().max().item() for layer, o in zip(layers, oracles)]
        diffs += [(a - b).abs().max().item() for a, b in zip([p for p in ours.parameters() if p.requires_grad
                                                             and not any(p is q for m in layers for q in m.factors())],
                                                            others)]
        trace.append(max(diffs))
    assert max(trace) <= TOL, trace
    assert min((layer.dense_weight() - w).abs().max().item() for layer, w in zip(layers, start)) > 100 * TOL
    assert switched >= 14 * 8  # every layer switched vectors many times (the frequency decays over the run)
    for layer, o in zip(layers, oracles):
        assert layer.selected_A.tolist() == o.sel_A and layer.selected_B.tolist() == o.sel_B
        assert layer.frozen_A.tolist() == o.fixed_A and layer.frozen_B.tolist() == o.fixed_B
        assert layer.pointer.tolist() == [o.ptr_A, o.ptr_B]
        assert (layer.candidates_A - o.cand_A).abs().max() <= TOL and (layer.candidates_B - o.cand_B).abs().max() <= TOL
        for p, name in ((layer.lora_A, "A"), (layer.lora_B, "B")):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert (opt.state[p][key] - o.state[name][key]).abs().max() <= TOL, key
    steps_a = opt.state[layers[0].lora_A]["step"].flatten().tolist()
    assert min(steps_a) < STEPS and len(set(steps_a)) > 1  # the switched rows restarted their own counters
