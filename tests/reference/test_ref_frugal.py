"""``frugal`` preset == FRUGAL, step for step, against an independent oracle of its equations.

Oracle, following fzmushko/FRUGAL@c7ebe4c: ``frugal/proj_optimizer_templates.py`` (``ProjOptimizer.step``,
``GaloreOptimizer``, ``CoordOptimizer``, ``BlockOptimizer``), ``frugal/adamw.py`` (``AdamW._compute_update``),
``frugal/galore_projector.py``, ``frugal/coordinate_projector.py``; ``utils/args_utils.py`` maps
``--optimizer frugal`` to ``block_adamw`` for pre-training (``coord_adamw`` for fine-tuning).

Per step, for every param with a gradient: W <- W (1 - lr wd) (every param, active or not), then W <- W + update:
plain params and active blocks take Adam, ``-(lr'/bc1) m / (sqrt(v)/sqrt(bc2) + eps)`` with lr' = lr *
proj_params_lr_scale for projectable ones; the state-free part takes ``-lr * proj_params_lr_scale *
inactive_lr_scale * sign(.)``. Every ``update_gap`` steps (the first projectable param's state step) the projection
is refreshed and, with reset_statistics, the moments restart from zero. Blocks: num_active = round(density * #tensors),
picked by ascending / descending / mirror (``next_block_start``) or random (a fresh ``randperm`` each period);
SVD: right projection by Vh[:r] when m >= n, left by U[:, :r] otherwise, r = round(density * that side); coordinates:
int(density * length) random columns / rows / entries (``randk``). FRUGAL draws its random choices from torch's
global generator; the oracle is handed rankwise's draw through ``choose`` (checked separately).
"""

from __future__ import annotations

import math

import pytest
import torch

from ref_model import TOL, max_weight_diff, moved, side_by_side, tiny_llama
from rankwise import methods
from rankwise.methods import OptimConfig
from rankwise.optim import param_groups

LR, GAP, STEPS = 3e-3, 3, 30  # 10 refreshes
EPS = 1e-4  # see test_ref_badam.py: a reset Adam's first steps amplify rounding when eps is tiny


class FrugalOracle:
    def __init__(self, groups, mode, lr, eps, density=0.25, update_gap=GAP, pls=1.0, ils=1.0, rule="sign_sgd",
                 reset=True, order="random", coord_choice="columns", proj_type="svd", choose=None,
                 betas=(0.9, 0.999)):
        self.groups = groups  # [{"params", "weight_decay", "proj": bool}]
        self.mode, self.lr, self.eps, self.betas = mode, lr, eps, betas
        self.density, self.gap, self.pls, self.ils, self.rule, self.reset = density, update_gap, pls, ils, rule, reset
        self.order, self.coord_choice, self.proj_type, self.choose = order, coord_choice, proj_type, choose
        self.state: dict[torch.Tensor, dict] = {}
        self.proj = [p for g in groups if g["proj"] for p in g["params"]]
        self.refreshes = 0
        if mode == "block":
            self.num_active = round(len(self.proj) * density)

    def zero_grad(self, set_to_none=True):
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    # ----------------------------------------------------------------- AdamW._compute_update (frugal/adamw.py)
    def adam(self, grad, st, lr):
        b1, b2 = self.betas
        st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** st["step"]) + self.eps
        return st["exp_avg"] / denom * (-lr / (1 - b1 ** st["step"]))

    @staticmethod
    def fresh(st, like):
        st.update(step=0, exp_avg=torch.zeros_like(like), exp_avg_sq=torch.zeros_like(like))

    # ----------------------------------------------------------------- projections
    def down(self, st, g):
        if self.mode == "svd":
            return g @ st["P"].t() if st["side"] == "right" else st["P"].t() @ g
        return g[st["idx"]] if self.coord_choice == "rows" else g[:, st["idx"]] if self.coord_choice == "columns" \
            else g.reshape(-1)[st["idx"]]

    def up(self, st, low, shape):
        if self.mode == "svd":
            return low @ st["P"] if st["side"] == "right" else st["P"] @ low
        full = torch.zeros(shape)
        if self.coord_choice == "rows":
            full[st["idx"]] = low
        elif self.coord_choice == "columns":
            full[:, st["idx"]] = low
        else:
            full.view(-1)[st["idx"]] = low
        return full

    def refresh(self):
        period = self.refreshes
        self.refreshes += 1
        if self.mode == "block":
            n, k = len(self.proj), self.num_active
            if self.order == "random":
                chosen = self.choose(period)
            elif self.order == "ascending":
                start = getattr(self, "start", 0)
                chosen = [(start + j) % n for j in range(k)]
                self.start = start + k - (n if start + k >= n else 0)
            elif self.order == "descending":
                start = getattr(self, "start", n - 1)
                chosen = [(start - j) % n for j in range(k)]
                self.start = start - k + (n if start - k < 0 else 0)
            else:  # mirror
                start, half = getattr(self, "start", 0), n // 2
                chosen = [i for j in range(start, start + k // 2) for i in (j % half, n - 1 - j % half)]
                self.start = start + k // 2 - (half if start + k // 2 >= half else 0)
            for i, p in enumerate(self.proj):
                st = self.state[p] = {"step": 0, "active": i in chosen}
                if st["active"]:
                    self.fresh(st, p)
            return
        for i, p in enumerate(self.proj):
            st = self.state.setdefault(p, {})
            g = p.grad
            m, n = g.shape
            if self.mode == "svd":
                st["side"] = "right" if m >= n else "left"
                r = round((n if st["side"] == "right" else m) * self.density)
                if self.proj_type == "svd":
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    st["P"] = vh[:r] if st["side"] == "right" else u[:, :r]
                else:  # randperm: the first r rows (right) / columns (left) of a random permutation matrix, i.e.
                    # r distinct unit vectors, their positions handed in by ``choose``
                    side = n if st["side"] == "right" else m
                    unit = torch.zeros(r, side)
                    unit[torch.arange(r), self.choose(p, period)] = 1.0
                    st["P"] = unit if st["side"] == "right" else unit.t()
            else:
                st["idx"] = self.choose(p, period)
            if "exp_avg" not in st:
                self.fresh(st, self.down(st, g))
            elif self.reset:
                st["step"] = 0
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()

    # ----------------------------------------------------------------- ProjOptimizer.step
    @torch.no_grad()
    def step(self):
        first = self.state.get(self.proj[0], {})
        if "step" not in first or first["step"] % self.gap == 0:
            self.refresh()
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state.setdefault(p, {})
                if "exp_avg" not in st and not group["proj"]:
                    self.fresh(st, p)
                p.mul_(1 - self.lr * group["weight_decay"])
                st["step"] += 1
                if not group["proj"]:
                    update = self.adam(g, st, self.lr)
                elif self.mode == "block":
                    inactive = -self.lr * self.pls * self.ils
                    update = (self.adam(g, st, self.lr * self.pls) if st["active"] else
                              inactive * g.sign() if self.rule == "sign_sgd" else inactive * g)
                else:
                    low = self.down(st, g)
                    update = self.up(st, self.adam(low, st, self.lr * self.pls), g.shape)
                    resid = g - self.up(st, low, g.shape)
                    update.add_(-self.lr * self.pls * self.ils * (resid.sign() if self.rule == "sign_sgd" else resid))
                p.add_(update)


def oracle_groups(model, wd):
    """The split rankwise trains with (FRUGAL's optimizer honours each group's weight_decay)."""
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "proj": g.get("project", True)}
            for g in param_groups(model, wd)]


def run(options: dict, oracle: dict, wd: float = 0.0, sync: bool = True):
    """(max |dW| over the steps, per-step trace, our model, our optimizer).

    ``sync``: sign(.) is discontinuous, so two free-running runs part by 2 lr_inactive wherever a gradient entry sits
    at rounding level (measured: jumps of exactly 6e-3 at lr 3e-3 in the SVD mode). Those cases copy the reference's
    weights into ours after every step: each of the 30 steps is compared from identical weights (identical
    gradients), while both optimizers' states run free. The continuous ``sgd`` rule runs free (``sync=False``).
    """
    holder, trace = {}, []

    def ours(m):
        method = methods.get("frugal", update_gap=GAP, **options)
        holder["opt"] = method.build_optimizer(m, OptimConfig(lr=LR, weight_decay=wd, eps=EPS))
        return holder["opt"]

    def choose(*args):
        opt = holder["opt"]
        if len(args) == 1:  # a block period
            return sorted(opt._active(opt.param_groups[0], args[0]))
        p, _ = args  # our model's param at the same position (ours stepped first this step)
        return opt.state[holder["ours_params"][holder["ref_pos"][id(p)]]]["index"].clone()

    def ref(m):
        holder["ref_pos"] = {id(p): i for i, p in enumerate(m.parameters())}
        return FrugalOracle(oracle_groups(m, wd), lr=LR, eps=EPS, update_gap=GAP, choose=choose, **oracle)

    def after(step, a, b):
        trace.append(max_weight_diff(a, b))
        if sync:
            with torch.no_grad():
                for p, q in zip(a.parameters(), b.parameters()):
                    p.copy_(q)

    model = tiny_llama(0)
    holder["ours_params"] = list(model.parameters())
    _, _, a, _ = side_by_side(ours, ref, steps=STEPS, model=model, after_step=after)
    return max(trace), trace, a, holder["opt"]


def test_frugal_preset_is_frugals_default_blockwise_adamw():
    """``--optimizer frugal``: BlockAdamW, density 0.25 of the tensors, random order, signSGD, weight decay on
    every tensor, active or not."""
    diff, trace, ours, opt = run({}, {"mode": "block"}, wd=0.1)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL
    assert opt.param_groups[0]["projector"] == "block" and len(opt.param_groups[0]["params"]) == 14
    assert len(opt._active(opt.param_groups[0], 0)) == round(14 * 0.25)


@pytest.mark.parametrize("order", ["descending", "ascending", "mirror"])
def test_frugal_block_orders_and_learning_rate_scales(order):
    """FRUGAL's C4 scripts use descending; state-free lr = lr * proj_params_lr_scale * inactive_lr_scale."""
    diff, trace, ours, _ = run({"block_order": order, "proj_params_lr_scale": 0.5, "inactive_lr_scale": 0.3},
                               {"mode": "block", "order": order, "pls": 0.5, "ils": 0.3})
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL


@pytest.mark.parametrize("choice", ["columns", "rows", "randk"])
def test_frugal_coordinates_as_in_fine_tuning(choice):
    """``coord_adamw`` (FRUGAL's fine-tuning ``frugal``): int(density * length) random columns / rows / entries."""
    diff, trace, ours, opt = run({"projector": choice, "inactive_lr_scale": 0.1},
                                 {"mode": "coord", "coord_choice": choice, "ils": 0.1}, wd=0.05)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL
    w = opt.param_groups[0]["params"][0]  # q_proj 64 x 64
    kept = {"columns": int(64 * 0.25), "rows": int(64 * 0.25), "randk": int(64 * 64 * 0.25)}[choice]
    idx = opt.state[w]["index"]
    assert idx.numel() == kept and idx.unique().numel() == kept


@pytest.mark.parametrize("projector,proj_type,rule", [("svd", "svd", "signsgd"), ("svd", "svd", "sgd"),
                                                      ("coordinates", "randperm", "signsgd")])
def test_frugal_galore_projection(projector, proj_type, rule):
    """``galore_adamw``: a density-sized SVD (or randperm) projection on GaLore's side, moments reset at refresh."""
    options = {"projector": projector, "residual": rule, "proj_params_lr_scale": 0.5, "inactive_lr_scale": 2.0}
    oracle = {"mode": "svd", "proj_type": proj_type, "rule": {"signsgd": "sign_sgd"}.get(rule, rule), "pls": 0.5,
              "ils": 2.0}
    diff, trace, ours, opt = run(options, oracle, wd=0.1)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL
    gate = opt.param_groups[0]["params"][4]  # gate_proj 96 x 64: rank round(0.25 * 64)
    assert opt._rank(gate, opt.param_groups[0]) == 16


def test_frugal_sgd_rule_runs_free_for_thirty_steps():
    """The continuous state-free rule (``inactive_update_rule="sgd"``): no re-alignment, 30 free steps."""
    options = {"residual": "sgd", "block_order": "descending", "proj_params_lr_scale": 0.5, "inactive_lr_scale": 2.0}
    oracle = {"mode": "block", "order": "descending", "rule": "sgd", "pls": 0.5, "ils": 2.0}
    diff, trace, ours, _ = run(options, oracle, wd=0.1, sync=False)
    assert diff <= TOL, trace
    assert moved(ours) > 1000 * TOL


def test_frugal_sampled_blocks_are_fresh_draws():
    model = tiny_llama(0)
    opt = methods.get("frugal").build_optimizer(model, OptimConfig())
    group = opt.param_groups[0]
    draws = [tuple(sorted(opt._active(group, p))) for p in range(30)]
    assert all(len(set(d)) == 4 and set(d) <= set(range(14)) for d in draws)
    assert len(set(draws)) > 20
