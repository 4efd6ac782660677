"""``lisa`` preset == LMFlow's LISA, step for step, against an independent oracle of its equations.

Oracle, following OptimalScale/LMFlow@f3597db ``src/lmflow/pipeline/utils/lisa_trainer.py``
(``DynamicLayerActivationCallback``) inside transformers' ``Trainer``: the optimizer is torch AdamW over every
parameter, decay split as ``Trainer.get_decay_parameter_names`` (no decay for biases and norms); at every step with
``global_step % interval_steps == 0`` (step 0 included) all params of ``model.model.layers`` get
``requires_grad=False`` and ``n_layers`` layers drawn without replacement get it back — a layer's norms with it;
embeddings, final norm and head are never frozen. A frozen param has no gradient, so AdamW skips it: no update, no
decay, its moments and step kept for when the layer comes back. LMFlow draws the layers with numpy's global
generator; the oracle is handed rankwise's draw (the test checks the draws separately).
"""

from __future__ import annotations

import re

import torch

from ref_model import TOL, moved, side_by_side, tiny_llama
from rankwise.optim import build

LR, GAP, STEPS, LAYERS = 3e-3, 3, 30, 4  # 10 switches
EPS = 1e-4  # see test_ref_badam.py: a reset Adam's first steps amplify rounding when eps is tiny
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]  # transformers' Trainer


class LisaOracle:
    """torch AdamW + LMFlow's layer switching (see the module docstring)."""

    def __init__(self, model, n_layers: int, interval: int, choose, lr: float, wd: float, eps: float):
        named = list(model.named_parameters())
        decay = [p for n, p in named if not any(re.search(pat, n.lower()) for pat in NO_DECAY)]
        rest = [p for n, p in named if any(re.search(pat, n.lower()) for pat in NO_DECAY)]
        self.adamw = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                                       lr=lr, eps=eps)
        self.layers, self.n_layers, self.interval, self.choose = model.model.layers, n_layers, interval, choose
        self.global_step = 0
        self.on_step_begin()

    def on_step_begin(self):
        if self.global_step % self.interval == 0:
            for layer in self.layers:
                layer.requires_grad_(False)
            chosen = self.choose(self.global_step // self.interval)
            assert len(chosen) == self.n_layers
            for i in chosen:
                self.layers[i].requires_grad_(True)

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.adamw.step()
        self.global_step += 1
        self.on_step_begin()  # the next step's begin


def run(wd: float, options: dict | None = None, n_layers: int = 2):
    model = tiny_llama(0, layers=LAYERS)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    holder, untouched = {}, []

    def ours(m):
        holder["opt"] = build("lisa", m, lr=LR, eps=EPS, weight_decay=wd, update_gap=GAP, **(options or {}))
        holder["prev"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        return holder["opt"]

    def choose(period):
        opt = holder["opt"]
        return sorted(opt._active(opt.param_groups[0], period))

    def after(step, m, ref):
        opt = holder["opt"]
        active = opt._active(opt.param_groups[0], (step - 1) // GAP)
        for n, p in m.named_parameters():
            layer = re.match(r"model\.layers\.(\d+)\.", n)
            if layer and int(layer.group(1)) not in active:
                untouched.append(torch.equal(p, holder["prev"][n]))
            elif not layer:
                untouched.append(not torch.equal(p, holder["prev"][n]))  # embeddings, final norm, head: always train
        holder["prev"] = {n: p.detach().clone() for n, p in m.named_parameters()}

    diff, trace, a, b = side_by_side(ours, lambda m: LisaOracle(m, n_layers, GAP, choose, LR, wd, EPS), steps=STEPS,
                                     model=model, after_step=after)
    return diff, trace, a, holder["opt"], start, untouched


def test_lisa_preset_matches_lmflow_lisa():
    """Defaults: 2 layers every ``interval`` steps, moments of a frozen layer kept; weight decay on."""
    diff, trace, ours, opt, start, untouched = run(0.1)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL
    assert untouched and all(untouched)
    seen = set().union(*(opt._active(opt.param_groups[0], p) for p in range(STEPS // GAP)))
    assert len(seen) == LAYERS  # every layer came back at least once (so the kept moments were resumed)


def test_lisa_one_layer_as_in_lmflows_script():
    diff, trace, ours, _, _, untouched = run(0.0, {"active_blocks": 1}, n_layers=1)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL and all(untouched)


def test_lisa_draws_distinct_layers_afresh_each_period():
    opt = build("lisa", tiny_llama(0, layers=LAYERS))
    group = opt.param_groups[0]
    draws = [tuple(sorted(opt._active(group, p))) for p in range(40)]
    assert all(len(set(d)) == 2 and set(d) <= set(range(LAYERS)) for d in draws)
    assert len(set(draws)) > 3  # not a fixed cycle
    counts = torch.bincount(torch.tensor([i for d in draws for i in d]), minlength=LAYERS)
    assert counts.min() > 0


def test_reset_moments_differ_from_lmflow():
    """``moments="reset"`` (today's behaviour, a named option) frees a frozen layer's moments: no longer LMFlow."""
    diff, _, _, _, _, untouched = run(0.0, {"moments": "reset"})
    assert diff > 100 * TOL and all(untouched)
