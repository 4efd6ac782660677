"""Sparse Spectral Training (``sst``): the layer's forward / backward against autograd, full sampling against a plain
SVD-parameterized step, the sampling law, re-SVD, the schedule's state resets, training, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from rankwise_testing import quick_config
from torch import nn

from rankwise import methods
from rankwise.errors import RankwiseError
from rankwise.methods import OptimConfig
from rankwise.models import build_model
from rankwise.reparam import SpectralLinear
from rankwise.reparam.sst import project_, resvd, round_generator, sample_active, sampling_probabilities


def _layer(out_features, in_features, rank, enhanced=True, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = SpectralLinear(linear.weight, linear.bias, rank, enhanced)
    active = sample_active(layer.sigma, rank, 0.5, round_generator(seed, 0, 0))
    U, V = layer.spectrum()
    layer.set_spectrum(U, layer.sigma.detach().clone(), V, active)
    with torch.no_grad():  # move away from an exact SVD so that every term of the gradient is exercised
        for p in (layer.U, layer.V, layer.sigma):
            p.add_(0.01 * torch.randn_like(p))
    return linear, layer


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
@pytest.mark.parametrize("enhanced", [False, True])
def test_forward_is_the_dense_weight_and_backward_is_autograd_of_u_sigma_vt(shape, enhanced):
    m, n = shape
    linear, layer = _layer(m, n, rank=5, enhanced=enhanced)
    torch.testing.assert_close(layer.dense_weight(), linear.weight, rtol=0, atol=0.05)  # the SVD init, perturbed
    x = torch.randn(3, 7, n, requires_grad=True)
    y = layer(x)
    ref_params = [t.detach().clone().requires_grad_(True) for t in (layer.U, layer.V, layer.sigma, layer.bias)]
    U_a, V_a, sigma, bias = ref_params
    x_ref = x.detach().clone().requires_grad_(True)
    U = torch.cat([U_a, layer.U_frozen], 1)
    V = torch.cat([V_a, layer.V_frozen], 1)
    y_ref = F.linear(x_ref, (U * sigma[layer.perm]) @ V.t(), bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, F.linear(x, layer.dense_weight(), layer.bias), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    scale = sigma.detach()[layer.perm[:5]] if enhanced else 1.0  # enhanced: the sigma_i factor dropped
    torch.testing.assert_close(layer.U.grad * scale, U_a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.V.grad * scale, V_a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.sigma.grad, sigma.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.U_frozen.grad is None and not layer.U_frozen.requires_grad


def _square_min_model(seed=0):
    """Every target matrix has min(m, n) = 64: q/k/v/o 64 x 64, gate/up 96 x 64, down 64 x 96."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


class PlainSVDLinear(nn.Module):
    """``W = U diag(s) V^T`` with all of U, s, V trained by plain autograd (the reference of full sampling)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        U, s, Vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        self.U, self.s, self.V = (nn.Parameter(U.float()), nn.Parameter(s.float()), nn.Parameter(Vh.t().float()))

    def forward(self, x):
        return F.linear(x, (self.U * self.s) @ self.V.t())

    def dense_weight(self):
        return (self.U * self.s) @ self.V.t()


def _loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def test_full_sampling_equals_a_plain_svd_parameterized_step():
    base = _square_min_model()
    method = methods.get("sst", rank=64, resample_every=10**6, enhanced_gradient=False)
    ours = method.prepare(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    names = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]
    plain = [PlainSVDLinear(ref.get_submodule(n)) for n in names]
    for n, layer in zip(names, plain):
        ref.set_submodule(n, layer)
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1)
    opt_ours, opt_ref = method.build_optimizer(ours, cfg), methods.Method().build_optimizer(ref, cfg)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        batch = torch.randint(0, 128, (4, 17), generator=g)
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            opt.step()
        method.after_step(step, ours, opt_ours)
        with torch.no_grad():  # SST's projection: unit singular vectors, sigma >= 0
            for layer in plain:
                layer.U.div_(layer.U.norm(dim=0))
                layer.V.div_(layer.V.norm(dim=0))
                layer.s.clamp_(min=0)
    diffs = [(a.dense_weight() - b.dense_weight()).abs().max().item() for a, b in zip(method.layers, plain)]
    assert max(diffs) <= 1e-5, diffs  # fp32, 30 steps: the same maths in another order
    moved = max((a.dense_weight() - base.get_submodule(n).weight).abs().max().item()
                for a, n in zip(method.layers, names))
    assert moved > 1e-3
    others = [(p, q) for (k, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters())
              if "embed" in k or "norm" in k or "lm_head" in k]
    assert others and max((p - q).abs().max().item() for p, q in others) <= 1e-5


def test_resampling_and_resvd_keep_the_product_and_resvd_restores_orthonormal_vectors():
    _, layer = _layer(40, 16, rank=16, bias=False)  # full sampling: a resample is a permutation
    w = layer.dense_weight().detach().clone()
    U, V = layer.spectrum()
    layer.set_spectrum(U, layer.sigma.detach().clone(), V, torch.randperm(16))
    torch.testing.assert_close(layer.dense_weight(), w, rtol=0, atol=1e-6)  # the sum in another order
    _, rect = _layer(16, 40, rank=4, bias=False)
    layers = [layer, rect, _layer(16, 40, rank=4, bias=False, seed=3)[1]]
    before = [lay.dense_weight().detach().clone() for lay in layers]
    resvd(layers)
    for lay, w in zip(layers, before):
        torch.testing.assert_close(lay.dense_weight(), w, rtol=1e-5, atol=1e-6)
        U, V = lay.spectrum()
        eye = torch.eye(lay.k)
        torch.testing.assert_close(U.t() @ U, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(V.t() @ V, eye, rtol=0, atol=1e-5)
        s = lay.sigma.detach()
        assert torch.all(s[:-1] >= s[1:])  # descending, as an SVD


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_sampling_frequencies_follow_the_singular_values(mix):
    sigma = torch.linspace(0.1, 2.0, 12) ** 2
    p = sampling_probabilities(sigma, mix)
    torch.testing.assert_close(p, mix / 12 + (1 - mix) * sigma.double() / sigma.double().sum(), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    # without replacement the first draw follows p exactly; later draws renormalize over what is left
    draws = torch.multinomial(p.float().expand(n, 12), 4, replacement=False, generator=g)
    counts = torch.bincount(draws[:, 0], minlength=12).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 31.3  # chi-square with 11 degrees of freedom, p = 0.001
    assert all(len(set(row.tolist())) == 4 for row in draws[:200])
    zeros = torch.cat([torch.zeros(9), torch.ones(3)])  # sigma clamped at 0: still `rank` distinct indices
    picked = sample_active(zeros, 5, 0.0, round_generator(0, 0, 0))
    assert picked.unique().numel() == 5 and set(picked[:3].tolist()) == {9, 10, 11}
    one = torch.stack([sample_active(sigma, 1, mix, round_generator(0, 0, t)) for t in range(3000)]).flatten()
    freq = torch.bincount(one, minlength=12).double() / 3000
    assert freq[-1] > freq[0] and (freq - p).abs().max() < 0.03


def _small():
    return build_model("tiny", vocab_size=512, seed=0, num_hidden_layers=2)


def test_schedule_resets_vector_state_each_draw_and_sigma_state_each_round():
    method = methods.get("sst", rank=16, resample_every=2, resamples_per_svd=2)
    model = method.prepare(_small())
    opt = method.build_optimizer(model, OptimConfig(lr=1e-3))
    batch = torch.randint(0, 512, (2, 17))
    layer = method.layers[0]
    assert method.round_length(layer) == 2 and methods.get("sst", rank=16).round_length(layer) == 256 // 16
    perms = [layer.perm.clone()]
    for step in range(1, 5):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        project_(method.layers)  # idempotent: after_step's own projection then changes nothing
        with torch.no_grad():
            x = torch.randn(2, 5, 256)
            before = model.model.layers[0].self_attn.q_proj(x)
        method.after_step(step, model, opt)
        if step % 2:  # mid-iteration: state kept
            assert layer.U in opt.state and layer.sigma in opt.state
            continue
        perms.append(layer.perm.clone())
        assert layer.U not in opt.state and layer.V not in opt.state  # every draw
        assert (layer.sigma in opt.state) == (step == 2)  # re-SVD at draw 2 (step 4) drops sigma's state
        with torch.no_grad():
            torch.testing.assert_close(model.model.layers[0].self_attn.q_proj(x), before, rtol=1e-4, atol=1e-5)
        assert torch.allclose(layer.U.norm(dim=0), torch.ones(16)) and layer.sigma.min() >= 0
    assert not torch.equal(perms[0][:16].sort().values, perms[1][:16].sort().values)
    U, V = layer.spectrum()  # just re-SVD'd at step 4
    torch.testing.assert_close(U.t() @ U, torch.eye(256), rtol=0, atol=1e-4)


def test_the_draws_are_a_pure_function_of_seed_layer_and_step():
    a, b = methods.get("sst", rank=8, seed=3), methods.get("sst", rank=8, seed=3)
    a.prepare(_small())
    b.prepare(_small())
    assert all(torch.equal(x.perm, y.perm) for x, y in zip(a.layers, b.layers))
    c = methods.get("sst", rank=8, seed=4)
    c.prepare(_small())
    assert not all(torch.equal(x.perm, y.perm) for x, y in zip(a.layers, c.layers))


def test_param_counts():
    from rankwise.models import count_params

    total = count_params(build_model("tiny", device="meta"))[1]
    shapes = [(256, 256)] * 4 + [(688, 256)] * 3
    model = methods.get("sst", rank=8).prepare(build_model("tiny", device="meta"))
    dense = 4 * sum(m * n for m, n in shapes)
    trained = 4 * sum(8 * (m + n) + min(m, n) for m, n in shapes)
    assert count_params(model)[0] == total - dense + trained
    frozen = sum(b.numel() for n, b in model.named_buffers() if "frozen" in n)
    assert frozen == 4 * sum((min(m, n) - 8) * (m + n) for m, n in shapes)  # the full spectrum is stored


def _tiny(corpus):
    return build_model("tiny", vocab_size=corpus.vocab_size, seed=0, num_hidden_layers=2)


SMALL = dict(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_batches=2, lr=3e-3)
OPTIONS = {"rank": 16, "resample_every": 3, "resamples_per_svd": 2}  # draws after steps 3 and 6, re-SVD at 6


def test_training_sst_in_bf16_lowers_the_loss(corpus):
    from rankwise.train import train

    m = train(quick_config(method="sst", method_options=OPTIONS, dtype="bf16", **SMALL), model=_tiny(corpus),
              corpus=corpus).metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.2 and math.isfinite(m["final_eval_loss"])


@pytest.mark.slow
def test_resume_is_exact_across_a_draw_and_a_resvd(corpus, tmp_path):
    from rankwise.train import train

    full = train(quick_config(method="sst", method_options=OPTIONS, **SMALL), model=_tiny(corpus), corpus=corpus)
    assert full.metrics["final_eval_loss"] < full.metrics["initial_eval_loss"] - 0.2
    train(quick_config(method="sst", method_options=OPTIONS, out=str(tmp_path), stop_at=4, **SMALL),
          model=_tiny(corpus), corpus=corpus)
    resumed = train(quick_config(method="sst", method_options=OPTIONS, out=str(tmp_path), resume=str(tmp_path),
                                 **SMALL), model=_tiny(corpus), corpus=corpus)
    state, want = resumed.model.state_dict(), full.model.state_dict()
    assert state.keys() == want.keys() and any(k.endswith(".perm") for k in want)
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("options, message", [
    ({"rank": 257}, r"rank must be in \[1, 256\] \(at most the smallest target dimension 256\)"),
    ({"resample_every": 0}, "resample_every must be a positive"),
    ({"resamples_per_svd": 0}, "resamples_per_svd must be a positive"),
    ({"uniform_mix": 1.5}, r"uniform_mix must be in \[0, 1\]"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(RankwiseError, match=message):
        methods.get("sst", **options).prepare(build_model("tiny", device="meta"))
