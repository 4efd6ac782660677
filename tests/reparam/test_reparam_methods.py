"""The registered methods: parameter counts by formula, after_step hooks, ReLoRA's schedule, training, bad input."""

from __future__ import annotations

import pytest
import torch
from rankwise_testing import quick_config

from rankwise import methods
from rankwise.errors import RankwiseError
from rankwise.models import build_model, count_params
from rankwise.reparam import LowRankLinear, ReLoRALinear


# tiny preset: hidden 256, ffn 688, 4 blocks; per block q, k, v, o are 256 x 256, gate/up 688 x 256, down 256 x 688
D, F, L = 256, 688, 4
SHAPES = [(D, D)] * 4 + [(F, D)] * 3  # (out, in) up to transposition: m + n and m * n are what count
DENSE_TARGETS = L * sum(m * n for m, n in SHAPES)


@pytest.mark.parametrize("rank", [8, 64])
def test_param_counts_equal_the_formulas(rank):
    total = count_params(build_model("tiny", device="meta"))[1]
    lowrank = methods.get("lowrank", rank=rank).prepare(build_model("tiny", device="meta"))
    factors = L * sum(rank * (m + n) for m, n in SHAPES)
    assert count_params(lowrank) == (total - DENSE_TARGETS + factors,) * 2

    sl = methods.get("sltrain", rank=rank, density=0.05).prepare(build_model("tiny", device="meta"))
    sparse = L * sum(int(0.05 * m * n) for m, n in SHAPES)
    assert count_params(sl) == (total - DENSE_TARGETS + factors + sparse,) * 2

    relora = methods.get("relora", rank=rank).prepare(build_model("tiny", device="meta"))
    assert count_params(relora) == (total - DENSE_TARGETS + factors, total + factors)

    ends = methods.get("lowrank", rank=rank, full_rank_ends=1).prepare(build_model("tiny", device="meta"))
    inner = 2 * sum(rank * (m + n) - m * n for m, n in SHAPES)
    assert count_params(ends)[0] == total + inner
    assert isinstance(ends.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(ends.model.layers[1].mlp.up_proj, LowRankLinear)


def _small_model():
    return build_model("tiny", vocab_size=512, seed=0, num_hidden_layers=2)


def _steps(model, method, batch, n=1):
    opt = method.build_optimizer(model, methods.OptimConfig(lr=1e-3))
    for _ in range(n):
        model(input_ids=batch).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_lowrank_rr_refactorizes_and_resets_only_the_factor_moments():
    method = methods.get("lowrank-rr", rank=16, refactor_every=3)
    model = method.prepare(_small_model())
    batch = torch.randint(0, 512, (2, 16))
    opt = _steps(model, method, batch)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    products = [layer.dense_weight().detach().clone() for layer in layers]
    method.after_step(2, model, opt)  # not due: nothing changes
    assert all(torch.equal(layer.dense_weight(), w) for layer, w in zip(layers, products))
    assert all(layer.lora_A in opt.state for layer in layers)
    with torch.no_grad():
        before = model(input_ids=batch).logits
    method.after_step(3, model, opt)
    for layer, w in zip(layers, products):
        torch.testing.assert_close(layer.dense_weight(), w, rtol=1e-5, atol=1e-6)
        assert layer.lora_A not in opt.state and layer.lora_B not in opt.state
    assert model.model.embed_tokens.weight in opt.state
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=1e-4, atol=1e-4)


def test_relora_merge_step_keeps_the_model_function_and_prunes_the_factor_state():
    method = methods.get("relora", rank=16, reset_every=4, restart_warmup=2, state_reset="magnitude", prune_ratio=0.9)
    model = method.prepare(_small_model())
    batch = torch.randint(0, 512, (2, 16))
    opt = _steps(model, method, batch, n=2)  # B = 0 at init: A's gradient (B^T G) is non-zero from step 2 on
    layers = [m for m in model.modules() if isinstance(m, ReLoRALinear)]
    assert layers and all(layer.lora_B.abs().sum() > 0 for layer in layers)
    with torch.no_grad():
        before = model(input_ids=batch).logits
    method.after_step(4, model, opt)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=1e-4, atol=1e-4)
    for layer in layers:
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        kept = opt.state[layer.lora_A]["exp_avg"] != 0
        assert int(kept.sum()) == layer.lora_A.numel() - int(0.9 * layer.lora_A.numel())


def test_relora_lr_factor_is_the_jagged_rewarmup():
    method = methods.get("relora", reset_every=10, restart_warmup=4)
    # lr_factor(s) scales optimizer step s + 1; merges happen after steps 10, 20, ...
    got = [method.lr_factor(s) for s in range(0, 26)]
    want = [1.0] * 10 + [1 / 5, 2 / 5, 3 / 5, 4 / 5] + [1.0] * 6 + [1 / 5, 2 / 5, 3 / 5, 4 / 5] + [1.0] * 2
    assert got == pytest.approx(want)
    assert methods.get("lowrank").lr_factor(10) == 1.0


@pytest.mark.parametrize("name, options, message", [
    ("lowrank", {"rank": 256}, r"rank must be in \[1, 255\]"),
    ("lowrank", {"reset_moments": True}, "set refactor_every > 0"),
    ("lowrank", {"refactor_every": -1}, "refactor_every must be >= 0"),
    ("lowrank", {"target": " , "}, "names no module"),
    ("sltrain", {"density": 1.5}, r"density must be in \(0, 1\)"),
    ("sltrain", {"alpha": 0}, "alpha must be > 0"),
    ("relora", {"state_reset": "zero"}, "valid: magnitude, random, full"),
    ("relora", {"reset_every": 0}, "reset_every must be a positive"),
    ("relora", {"reset_every": 10, "restart_warmup": 10}, r"restart_warmup must be in \[0, reset_every=10\)"),
    ("relora", {"prune_ratio": 2}, r"prune_ratio must be in \[0, 1\]"),
])
def test_bad_options_raise_one_clear_error(name, options, message):
    with pytest.raises(RankwiseError, match=message):
        methods.get(name, **options).prepare(build_model("tiny", device="meta"))


def test_training_sltrain_in_bf16_and_relora_resume_exactly_across_a_merge(corpus, tmp_path):
    from rankwise.train import train

    def model():
        return build_model("tiny", vocab_size=corpus.vocab_size, seed=0, num_hidden_layers=2)

    small = dict(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_batches=2, lr=3e-3)
    m = train(quick_config(method="sltrain", method_options={"rank": 16}, dtype="bf16", **small), model=model(),
              corpus=corpus).metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.2
    relora = {"rank": 16, "reset_every": 3, "restart_warmup": 1}
    full = train(quick_config(method="relora", method_options=relora, **small), model=model(), corpus=corpus)
    assert full.metrics["final_eval_loss"] < full.metrics["initial_eval_loss"] - 0.2
    train(quick_config(method="relora", method_options=relora, out=str(tmp_path), stop_at=4, **small), model=model(),
          corpus=corpus)
    resumed = train(quick_config(method="relora", method_options=relora, out=str(tmp_path), resume=str(tmp_path),
                                 **small), model=model(), corpus=corpus)
    state, want = resumed.model.state_dict(), full.model.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=0, atol=0, msg=key)
    assert isinstance(resumed.model.model.layers[0].self_attn.q_proj, ReLoRALinear)
