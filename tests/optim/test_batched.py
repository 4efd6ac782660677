"""The batched step (``optim/batched.py``) computes what the per-param path (``SplitOptimizer._update``) computes.

On the CPU the batched step is bit-exact: each ``bmm`` slice has the strides of the per-param matrix product (the same
BLAS call), foreach ops are the per-tensor ops. 32 steps with a refresh every 5 (7 refreshes: new SVD / random bases,
moments kept, reset or rotated), weight decay, on a micro LLaMA with square (32x32) and rectangular (80x32, 32x80)
matrices; and the batched run really takes the batched path (no per-param update at all). The ``GradientScaling``
residuals (fira, fira_exact, apollo, apollo-mini) run their limiter from the second step on (it cuts the norm in most
of these steps), with step counts that differ between the matrices of a stack under ``stagger`` + ``reset``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from optim_helpers import micro_model, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.optim import SplitOptimizer, batched, build
from rankwise.optim.rules import INNER_RULES, AdamW

STEPS, GAP = 32, 5

CASES = [
    ("galore", {"rank": 8, "weight_decay": 0.1}),
    ("galore", {"rank": 8, "stagger": True}),
    ("fira", {"rank": 8, "weight_decay": 0.1}),
    ("fira", {"rank": 8, "residual": "fira_exact", "moments": "rotate"}),
    ("fira", {"rank": 8, "projector": "random", "moments": "reset", "stagger": True}),
    ("apollo", {"rank": 8, "weight_decay": 0.1}),
    ("apollo", {"rank": 8, "moments": "reset", "stagger": True}),  # per-matrix step counts: gains differ in a stack
    ("apollo-mini", {"weight_decay": 0.1}),  # rank 1, tensor-wise
    ("frugal", {"weight_decay": 0.1}),  # block selector + signSGD (the preset)
    ("frugal", {"projector": "svd", "density": None, "rank": 8}),  # FRUGAL's SVD mode: signSGD of Gt - P P^T Gt
    ("galore", {"projector": "random", "rank": 8, "moments": "rotate", "weight_decay": 0.1}),
    ("galore", {"projector": "rsvd", "rank": 8, "inner": "adam", "moments": "reset", "weight_decay": 0.1}),
    ("split", {"rank": 8, "inner": "sgd", "residual": "sgd", "moments": "rotate", "nesterov": True,
               "weight_decay": 0.1}),
    ("adamw", {"weight_decay": 0.1}),
    ("badam", {}),
    ("lisa", {}),
]


def count_per_param(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    update = SplitOptimizer._update

    def counted(self, p, group):
        calls["n"] += 1
        update(self, p, group)

    monkeypatch.setattr(SplitOptimizer, "_update", counted)
    return calls


def run(name: str, options: dict, batched_step: bool, steps: int = STEPS):
    model = micro_model()
    opt = build(name, model, update_gap=GAP, lr=1e-2, **options)
    opt.batched = batched_step
    train_steps(model, opt, range(steps))
    return model, opt


def assert_same(a, b) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name,options", CASES)
def test_batched_step_is_the_per_param_step_bit_exact(name, options, monkeypatch):
    calls = count_per_param(monkeypatch)
    ours, opt = run(name, options, True)
    assert calls["n"] == 0  # every param took the batched path
    ref, ref_opt = run(name, options, False)
    assert calls["n"] > 0
    assert_same(ours, ref)
    assert max((p - q).abs().max().item() for p, q in zip(ref.parameters(), micro_model().parameters())) > 1e-2
    # the state is per param and the same, tensor for tensor (state_dict format unchanged, no views of stacks)
    mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for i in theirs:
        assert mine[i].keys() == theirs[i].keys()
        for key, value in theirs[i].items():
            if torch.is_tensor(value):
                assert torch.equal(mine[i][key], value) and mine[i][key].dtype == value.dtype
                assert mine[i][key].untyped_storage().nbytes() == value.untyped_storage().nbytes()
            else:
                assert mine[i][key] == value


def test_small_batches_are_the_same_step(monkeypatch):
    """Stacks cut at ``BATCH_NUMEL`` elements (here: one or two matrices per stack) change nothing."""
    monkeypatch.setattr(batched, "BATCH_NUMEL", 3000)
    for name, options in (("fira", {"rank": 8, "weight_decay": 0.1}), ("apollo", {"rank": 8}), ("adamw", {}),
                          ("frugal", {})):
        assert_same(run(name, options, True, steps=12)[0], run(name, options, False, steps=12)[0])


@pytest.mark.parametrize("name,options", [("adamw", {"weight_decay": 0.1}), ("galore", {"rank": 8}), ("lisa", {}),
                                          ("split", {"rank": 8, "inner": "sgd", "nesterov": True}),
                                          ("split", {"rank": 8, "inner": "adam", "weight_decay": 0.1})])
def test_tiled_whole_gradients_are_the_same_step(name, options, monkeypatch):
    """On the CPU, plain params and selected blocks larger than ``CPU_FOREACH_NUMEL`` are updated tile by tile (here
    1000 elements: the 128 x 32 embedding and head in five tiles, the last one ragged, LISA's active 80 x 32 blocks
    in three): bit for bit the whole-tensor update, the step counted once per param."""
    monkeypatch.setattr(batched, "CPU_FOREACH_NUMEL", 1000)
    tiled = []
    cut = batched._tiles

    def counted(inner, ps, gs, states):
        out = cut(inner, ps, gs, states)
        tiled.append(len(out[0]) > len(ps))
        return out

    monkeypatch.setattr(batched, "_tiles", counted)
    ours, opt = run(name, options, True, steps=12)
    assert any(tiled)
    ref, ref_opt = run(name, options, False, steps=12)
    assert_same(ours, ref)
    steps = [s["step"].item() for s in opt.state.values() if "step" in s]
    assert steps == [s["step"].item() for s in ref_opt.state.values() if "step" in s] and max(steps) == 12


@pytest.mark.parametrize("name,options", [("fira", {"rank": 8}), ("apollo", {"rank": 8}), ("apollo-mini", {})])
def test_resume_from_a_per_param_checkpoint_is_bit_exact(name, options, monkeypatch):
    """A state saved by the per-param step (any existing checkpoint: bases or seeds, moments, limiter norms) resumes
    under the batched step exactly, across a refresh (at step 10)."""
    ref, ref_opt = run(name, options, False, steps=7)
    model, opt = run(name, options, False, steps=0)
    model.load_state_dict(ref.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch's load keeps the given tensors
    opt.batched = True
    calls = count_per_param(monkeypatch)
    train_steps(model, opt, range(7, 14))
    assert calls["n"] == 0
    train_steps(ref, ref_opt, range(7, 14))
    assert calls["n"] > 0
    assert_same(model, ref)


def test_uncovered_parts_take_the_per_param_path(monkeypatch):
    """A rule that is not in ``BATCHED_INNER`` (here a subclass of AdamW: exact types only), coordinate subsets and
    a state with a key the batched step does not know (e.g. a quantized moment) are updated one param at a time, and
    the result is the same."""
    class MyAdamW(AdamW):
        name = "my_adamw"

    monkeypatch.setitem(INNER_RULES, "my_adamw", MyAdamW)
    calls = count_per_param(monkeypatch)
    mine, _ = run("galore", {"rank": 8, "inner": "my_adamw", "eps": 1e-8}, True, steps=6)
    assert calls["n"] > 0
    assert_same(mine, run("galore", {"rank": 8, "inner": "adamw", "eps": 1e-8}, True, steps=6)[0])
    calls["n"] = 0
    run("frugal", {"projector": "columns", "density": None, "rank": 4}, True, steps=2)
    assert calls["n"] > 0

    model, opt = run("adamw", {}, True, steps=1)
    p = next(model.parameters())
    opt.state[p]["unknown"] = 1
    calls["n"] = 0
    train_steps(model, opt, range(1, 2))
    assert calls["n"] == 1
