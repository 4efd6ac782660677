"""AltLoRA step for step against an oracle of the reference optimizer and trainer.

Reference: github.com/LucasXinYu/AltLoRA @ 94b219882abcaa6004d2029fd8a09cd190a8a9aa: class ``altlora`` in
``optimizer_new.py`` (Algorithm 1: preconditioned gradients, momentum transported by ``(B^T B + reg)^-1 B^T B_old``
/ ``A_old A^T (A A^T + reg)^-1``, bias-corrected EMA, no second moment, weight decay after the update), created in
``logtrainer.py`` ``create_optimizer`` (betas (0.9, 0.999), weight decay 1e-5, reg 1e-5) and switched by
``LogTrainer.training_step`` (``alter_freq = 10``: before every 10th step it freezes B and unfreezes A, then the
other way round, so steps 1-9 are joint, 10-19 A only, 20-29 B only, ...). The oracle re-derives those equations
per layer and switches by freezing factors (``requires_grad``) as the reference trainer does.
"""

from __future__ import annotations

import torch
from ref_model import TOL, batches, loss_of, side_by_side, tiny_llama

from rankwise import adapters
from rankwise.adapters import AltLoRA
from rankwise.adapters.lora import LoRA

TARGET = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # 64x64, 32x64, 96x64, 64x96
R, ALPHA, LR, WD, REG = 8, 16.0, 1e-2, 1e-5, 1e-5  # the reference trainer's wd and reg
STEPS = 32  # switches before steps 10 (to A), 20 (to B) and 30 (to A)


def lora_model(seed: int = 0) -> torch.nn.Module:
    return adapters.apply(tiny_llama(seed), "lora", r=R, alpha=ALPHA, target=TARGET, seed=seed)


def loras(model: torch.nn.Module) -> list[LoRA]:
    return list(adapters.active_parameterizations(model).values())


class OracleAltLoRA:
    """The reference ``altlora.step``: for each (lora_A, lora_B) pair, A first, each only if it has a gradient."""

    def __init__(self, model: torch.nn.Module, lr: float, beta1: float = 0.9, weight_decay: float = WD,
                 reg: float = REG):
        self.pairs = [(lo.lora_A, lo.lora_B) for lo in loras(model)]
        self.lr, self.beta1, self.wd, self.reg = lr, beta1, weight_decay, reg
        self.state: dict[int, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for a, b in self.pairs:
            a.grad = b.grad = None

    def _new(self, shape, other_shape) -> dict:
        return {"step": 0, "exp_avg": torch.zeros(shape, dtype=torch.float64),
                "old": torch.zeros(other_shape, dtype=torch.float64)}

    @torch.no_grad()
    def step(self) -> None:
        for A, B in self.pairs:
            r = A.shape[0]
            eye = torch.eye(r, dtype=torch.float64)
            if A.grad is not None:
                st = self.state.setdefault(id(A), self._new(A.shape, B.shape))
                st["step"] += 1
                Bd = B.data.double()
                b_precon = torch.linalg.solve(Bd.T @ Bd + self.reg * eye, eye)
                transport = b_precon @ Bd.T @ st["old"]
                st["exp_avg"] = self.beta1 * transport @ st["exp_avg"] + (1 - self.beta1) * b_precon @ A.grad.double()
                new = A.data.double() - self.lr / (1 - self.beta1 ** st["step"]) * st["exp_avg"]
                new = new - self.lr * self.wd * new
                A.data.copy_(new.float())
                st["old"] = Bd.clone()
            if B.grad is not None:
                st = self.state.setdefault(id(B), self._new(B.shape, A.shape))
                st["step"] += 1
                Ad = A.data.double()  # already updated in a joint step
                a_precon = torch.linalg.solve(Ad @ Ad.T + self.reg * eye, eye)
                transport = st["old"] @ Ad.T @ a_precon
                st["exp_avg"] = self.beta1 * st["exp_avg"] @ transport + (1 - self.beta1) * B.grad.double() @ a_precon
                new = B.data.double() - self.lr / (1 - self.beta1 ** st["step"]) * st["exp_avg"]
                new = new - self.lr * self.wd * new
                B.data.copy_(new.float())
                st["old"] = Ad.clone()


def switch_like_the_reference_trainer(step: int, ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """``LogTrainer.training_step`` before step ``step + 1``: every 10th step flip which factor trains."""
    nxt = step + 1
    if nxt % 10:
        return
    update_a = (nxt // 10) % 2 == 1
    for lo in loras(ref):
        lo.lora_A.requires_grad_(update_a)
        lo.lora_B.requires_grad_(not update_a)


def run(steps: int = STEPS, alternate_every: int = 10, seed: int = 0):
    model = lora_model(seed)
    ours = lambda m: AltLoRA([p for p in m.parameters() if p.requires_grad], loras(m), lr=LR,  # noqa: E731
                             weight_decay=WD, reg=REG, alternate_every=alternate_every)
    ref = lambda m: OracleAltLoRA(m, LR)  # noqa: E731
    hook = switch_like_the_reference_trainer if alternate_every else None
    return side_by_side(ours, ref, steps=steps, model=model, seed=seed, after_step=hook)


def test_altlora_matches_reference_step_for_step_across_switches():
    start = [(lo.lora_A.detach().clone(), lo.lora_B.detach().clone()) for lo in loras(lora_model())]
    final, trace, ours, ref = run()
    assert max(trace) <= TOL, trace
    moved_a = max((lo.lora_A - a).abs().max().item() for lo, (a, _) in zip(loras(ours), start))
    moved_b = max((lo.lora_B - b).abs().max().item() for lo, (_, b) in zip(loras(ours), start))
    assert min(moved_a, moved_b) > 100 * TOL, (moved_a, moved_b)
    # and the schedule really alternated: ours moves only B on steps 20-29, only A on 10-19 and 30-
    opt = AltLoRA([p for p in ours.parameters() if p.requires_grad], loras(ours))
    assert [opt.phase(t) for t in (1, 9, 10, 19, 20, 29, 30)] == \
        [(True, True)] * 2 + [(True, False)] * 2 + [(False, True)] * 2 + [(True, False)]


def test_altlora_joint_mode_matches_the_reference_script_default():
    final, trace, _, _ = run(steps=12, alternate_every=0)  # main_lora.py: lora_alt = False
    assert max(trace) <= TOL, trace


def test_altlora_rests_one_factor_and_keeps_only_first_moments():
    model = lora_model()
    opt = AltLoRA([p for p in model.parameters() if p.requires_grad], loras(model), lr=LR, alternate_every=1)
    b_before = [lo.lora_B.detach().clone() for lo in loras(model)]
    loss_of(model, batches(1)[0]).backward()
    opt.step()  # step 1 with k = 1: A only, and A's gradient is 0 while B = 0
    assert all(torch.equal(lo.lora_B, b) for lo, b in zip(loras(model), b_before))
    st = opt.state[loras(model)[0].lora_A]
    assert set(st) == {"schedule_step", "step", "exp_avg", "other_old"}  # no second moment
    assert st["exp_avg"].shape == loras(model)[0].lora_A.shape
