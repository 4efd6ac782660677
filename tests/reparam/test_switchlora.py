"""SwitchLoRA: the init, a switch keeps the function, only the counterparts' state restarts, the schedule, the
frozen steps, training on the corpus with an exact resume, bad options. (The step-for-step oracle of the reference
loop is tests/reference/test_ref_switchlora.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from rankwise_testing import quick_config
from torch import nn

from rankwise import methods
from rankwise.errors import RankwiseError
from rankwise.models import build_model
from rankwise.reparam.switchlora import SwitchLoRALinear, init_bounds, switch_count, switch_rate


def _layer(n_in: int, n_out: int, rank: int, seed: int = 0) -> tuple[nn.Linear, SwitchLoRALinear]:
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=True)
    dense = nn.Linear(n_in, n_out, bias=True)
    dense.load_state_dict(base.state_dict())
    return dense, SwitchLoRALinear(base, rank)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (40, 24)])
def test_init_starts_as_the_dense_layer_with_factors_from_the_pool(shape):
    n_in, n_out = shape
    dense, layer = _layer(n_in, n_out, 6)
    pool = min(shape)
    x = torch.randn(5, n_in)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-6)
    assert layer.candidates_A.shape == (pool, n_in) and layer.candidates_B.shape == (pool, n_out)
    assert layer.selected_A.tolist() == list(range(pool - 6, pool))
    assert layer.selected_B.tolist() == [pool - 6 + (i - 3) % 6 for i in range(6)]  # rotated by r / 2
    assert torch.equal(layer.lora_A, layer.candidates_A[layer.selected_A])
    assert torch.equal(layer.lora_B, layer.candidates_B[layer.selected_B].t())
    bound_a, bound_b = init_bounds(n_in, n_out, 6)
    assert layer.candidates_A.abs().max() <= bound_a and layer.candidates_B.abs().max() <= bound_b
    # (1/r) B A has the variance 1/(3 n) of kaiming_uniform(a=sqrt(5)): std_A^2 std_B^2 / r = 1 / (3 n)
    assert (bound_a ** 2 / 3) * (bound_b ** 2 / 3) / 6 == pytest.approx(1 / (3 * n_in))
    assert layer.scale == 1 / 6 and not layer.weight.requires_grad


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (40, 24)])
def test_a_switch_keeps_the_function_and_moves_the_old_vectors_to_the_pool(shape):
    n_in, n_out = shape
    _, layer = _layer(n_in, n_out, 8)
    with torch.no_grad():  # a trained-looking layer: factors away from the pool
        layer.lora_A.add_(torch.randn_like(layer.lora_A))
        layer.lora_B.add_(torch.randn_like(layer.lora_B))
    x = torch.randn(7, n_in)
    for count in (3, 1, 2, 4):
        old_a, old_b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        sel_a, sel_b = layer.selected_A.clone(), layer.selected_B.clone()
        ptr = layer.pointer.tolist()
        with torch.no_grad():
            before = layer(x)
            rows, cols = layer.switch(count)
            after = layer(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        k = int(rows.sum())
        assert k == int(cols.sum()) == min(count, (ptr[0] - ptr[1]) % 8, (ptr[1] - ptr[0]) % 8)
        assert rows.nonzero().flatten().tolist() == sorted((ptr[0] + i) % 8 for i in range(k))
        assert cols.nonzero().flatten().tolist() == sorted((ptr[1] + i) % 8 for i in range(k))
        assert layer.pointer.tolist() == [(ptr[0] + k) % 8, (ptr[1] + k) % 8]
        assert torch.equal(layer.candidates_A[sel_a[rows]], old_a[rows])  # old rows saved to their slots
        assert torch.equal(layer.candidates_B[sel_b[cols]], old_b[:, cols].t())
        assert torch.equal(layer.lora_A[~rows], old_a[~rows]) and torch.equal(layer.lora_B[:, ~cols], old_b[:, ~cols])
        assert torch.equal(layer.lora_A[rows], layer.candidates_A[layer.selected_A[rows]])
        assert set(layer.selected_A[rows].tolist()).isdisjoint(sel_a.tolist())  # fresh slots, taken in order
        assert layer.selected_A.unique().numel() == 8 and layer.selected_B.unique().numel() == 8


def test_the_switch_frequency_decays_as_in_the_reference():
    assert switch_rate(9, 10) == pytest.approx(0.3)  # 0.3 at t + 1 = descent_steps
    assert switch_rate(19, 10) == pytest.approx(0.09)
    assert switch_rate(10**6, 10) == 1e-8  # floored
    # rank 128, interval 40: 3.2 vectors a step at the start, rounded up with probability 0.2 (the fraction)
    expected = 128 / (40 / switch_rate(0, 1000))
    assert switch_count(128, 0, 40.0, 1000, u=expected % 1 - 1e-9) == 4
    assert switch_count(128, 0, 40.0, 1000, u=expected % 1 + 1e-9) == 3
    us = torch.rand(4000, generator=torch.Generator().manual_seed(0)).tolist()
    for step in (0, 500, 3000):
        mean = sum(switch_count(128, step, 40.0, 1000, u) for u in us) / len(us)
        assert mean == pytest.approx(128 * switch_rate(step, 1000) / 40, abs=0.05)


def _model():
    return build_model("tiny", vocab_size=512, seed=0, num_hidden_layers=2)


def _backward(model, batch):
    model(input_ids=batch).logits.float().logsumexp(-1).mean().backward()


def test_a_switch_resets_only_the_counterparts_state_and_freezes_them():
    method = methods.get("switchlora", rank=16, interval=4.0, frozen_steps=2)
    model = method.prepare(_model())
    opt = method.build_optimizer(model, methods.OptimConfig(lr=1e-3))
    batch = torch.randint(0, 512, (2, 16))
    layers = [m for m in model.modules() if isinstance(m, SwitchLoRALinear)]
    for step in range(1, 4):
        opt.zero_grad(set_to_none=True)
        _backward(model, batch)
        opt.step()
        method.after_step(step, model, opt)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    slots = [(layer.selected_A.clone(), layer.selected_B.clone()) for layer in layers]
    opt.zero_grad(set_to_none=True)
    _backward(model, batch)
    grads = {p: p.grad.clone() for layer in layers for p in layer.factors()}
    frozen_before = [(layer.frozen_A.clone(), layer.frozen_B.clone()) for layer in layers]
    method.switch(opt)  # what the pre-step hook runs
    n_reset = 0
    for layer, (sel_a, sel_b), (fa, fb) in zip(layers, slots, frozen_before):
        rows, cols = layer.selected_A != sel_a, layer.selected_B != sel_b  # switched rows of A / columns of B
        for p, reset, f0, f1 in ((layer.lora_B, rows.unsqueeze(0), fb.unsqueeze(0), layer.frozen_B.unsqueeze(0)),
                                 (layer.lora_A, cols.unsqueeze(1), fa.unsqueeze(1), layer.frozen_A.unsqueeze(1))):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                new, old = opt.state[p][key], before[p][key]
                assert torch.equal(new, torch.where(reset, torch.zeros_like(old), old)), key
            n_reset += int(reset.sum())
            frozen_now = torch.where(reset, torch.full_like(f0, 2), f0)  # frozen_steps = 2, this update included
            assert torch.equal(f1, (frozen_now - 1).clamp(min=0))
            assert torch.equal(p.grad, torch.where(frozen_now > 0, torch.zeros_like(grads[p]), grads[p]))
    assert n_reset > 0
    others = [p for p in before if not any(p is q for layer in layers for q in layer.factors())]
    assert others and all(torch.equal(opt.state[p][k], before[p][k]) for p in others for k in before[p])


def test_counterparts_stay_frozen_for_frozen_steps_updates():
    method = methods.get("switchlora", rank=16, interval=8.0, frozen_steps=3)
    model = method.prepare(_model())
    opt = method.build_optimizer(model, methods.OptimConfig(lr=1e-2))
    batch = torch.randint(0, 512, (2, 16))
    layer = next(m for m in model.modules() if isinstance(m, SwitchLoRALinear))
    history = []
    for step in range(1, 9):
        opt.zero_grad(set_to_none=True)
        _backward(model, batch)
        sel = layer.selected_A.clone()
        opt.step()
        method.after_step(step, model, opt)
        history.append((layer.selected_A != sel, layer.lora_B.detach().clone()))
    # rows of A switched at update s: B's columns of those rows do not move in updates s, s+1, s+2, then move
    rows, b0 = history[1]
    assert rows.any()
    cols = rows & ~history[0][0] & ~history[2][0] & ~history[3][0] & ~history[4][0]
    assert cols.any()
    b_prev = history[0][1]
    for s in (1, 2, 3):
        assert torch.equal(history[s][1][:, cols], b_prev[:, cols])
    assert not torch.equal(history[4][1][:, cols], b_prev[:, cols])


def test_param_counts_and_buffers():
    model = methods.get("switchlora", rank=8).prepare(build_model("tiny", device="meta"))
    layers = [m for m in model.modules() if isinstance(m, SwitchLoRALinear)]
    assert len(layers) == 4 * 7
    for layer in layers:
        m, n = layer.out_features, layer.in_features
        assert layer.candidates_A.numel() + layer.candidates_B.numel() == min(m, n) * (m + n)
        assert layer.lora_A.numel() + layer.lora_B.numel() == 8 * (m + n)


@pytest.mark.parametrize("options, message", [
    ({"rank": 256}, r"rank must be in \[1, 255\]"),
    ({"interval": 0}, "interval must be > 0"),
    ({"interval": 8, "frozen_steps": 5}, r"at least 2 x frozen_steps"),
    ({"frozen_steps": -1}, "frozen_steps must be >= 0"),
    ({"descent_steps": 0}, "descent_steps must be a positive"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"target": "nothing"}, "no nn.Linear module name contains"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(RankwiseError, match=message):
        methods.get("switchlora", **options).prepare(build_model("tiny", device="meta"))


def test_training_on_the_corpus_lowers_the_loss_and_resumes_bit_exactly(corpus, tmp_path):
    from rankwise.train import train

    def model():
        return build_model("tiny", vocab_size=corpus.vocab_size, seed=0, num_hidden_layers=2)

    small = dict(steps=10, batch_size=4, seq_len=32, warmup_steps=2, eval_batches=2, lr=1e-2)
    options = {"rank": 16, "interval": 10.0, "descent_steps": 5, "frozen_steps": 2}
    full = train(quick_config(method="switchlora", method_options=options, **small), model=model(), corpus=corpus)
    assert full.metrics["final_eval_loss"] < full.metrics["initial_eval_loss"] - 0.2
    train(quick_config(method="switchlora", method_options=options, out=str(tmp_path), stop_at=4, **small),
          model=model(), corpus=corpus)
    resumed = train(quick_config(method="switchlora", method_options=options, out=str(tmp_path),
                                 resume=str(tmp_path), **small), model=model(), corpus=corpus)
    state, want = resumed.model.state_dict(), full.model.state_dict()
    assert state.keys() == want.keys() and any(k.endswith("candidates_A") for k in want)
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=0, atol=0, msg=key)
    layer = resumed.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SwitchLoRALinear)
    assert layer.selected_A.tolist() != list(range(256 - 16, 256))  # it switched during the run
    assert not math.isnan(resumed.metrics["final_eval_loss"])


def test_slice_adamw_is_adamw_and_a_reset_slice_restarts_like_a_fresh_adam():
    from rankwise.reparam import SliceAdamW

    g = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(6, 5, generator=g))
    plain = nn.Parameter(a.detach().clone())
    ours = SliceAdamW([{"params": [a], "slice_dim": 0}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.1)
    grads = [torch.randn(6, 5, generator=g) for _ in range(6)]
    for grad in grads[:3]:
        a.grad, plain.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, plain, rtol=0, atol=1e-6)
    assert ours.state[a]["step"].shape == (6, 1) and ours.state[a]["step"].eq(3).all()
    with torch.no_grad():  # restart row 2: moments and its own step
        for key in ("exp_avg", "exp_avg_sq", "step"):
            ours.state[a][key][2].zero_()
    row = nn.Parameter(a.detach()[2:3].clone())
    fresh = torch.optim.AdamW([row], lr=1e-2, weight_decay=0.1)
    for grad in grads[3:]:
        a.grad, row.grad = grad.clone(), grad[2:3].clone()
        ours.step()
        fresh.step()
    torch.testing.assert_close(a[2:3], row, rtol=0, atol=1e-6)
    assert ours.state[a]["step"].flatten().tolist() == [6, 6, 3, 6, 6, 6]
