import math

import pytest
import torch

from analysis_helpers import random_batches, small_llama, with_spectrum
from rankwise.analysis import LowRankLinear, compress, densify, linear_weights, lrc_parameters, welore_ranks
from rankwise.analysis.welore import normalized_spectrum, uniform_ranks
from rankwise.errors import RankwiseError


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_ratio_zero_is_the_identity():
    model = small_llama()
    batch = random_batches(1)[0]
    before = _logits(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = compress(model, 0.0)
    assert report.lrc == [] and report.rank_reduction == 0.0 and report.param_ratio == 1.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, batch), before)


def test_global_threshold_on_constructed_spectra():
    heavy = torch.tensor([10.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0])   # normalised: one big value, a low tail
    flat = torch.tensor([1.0, 0.97, 0.93, 0.9, 0.87, 0.84, 0.8, 0.0]) # normalised: most values near the top
    spectra = {"heavy": heavy, "flat": flat}
    for ratio in (0.125, 0.25, 0.5, 0.75):
        ranks = welore_ranks(spectra, ratio)
        removed = sum(8 - k for k in ranks.values())
        assert removed == math.ceil(ratio * 16)                      # distinct values: exact global ratio
        assert 8 - ranks["heavy"] >= 8 - ranks["flat"]
    assert welore_ranks(spectra, 0.5) == {"heavy": 1, "flat": 7}  # the 8 smallest normalised values: 7 + 1
    # the threshold is on normalised values: scaling a matrix does not change its rank
    assert welore_ranks({"heavy": 1e3 * heavy, "flat": flat}, 0.5) == welore_ranks(spectra, 0.5)
    torch.testing.assert_close(normalized_spectrum(torch.tensor([3.0, 2.0, 1.0])), torch.tensor([1.0, 0.5, 0.0]))
    assert uniform_ranks(spectra, 0.5) == {"heavy": 4, "flat": 4}


def test_compressed_layers_are_the_best_rank_k_approximations():
    model = small_llama(vocab=64, hidden=64, inter=96)
    weights = {n: w.detach().clone() for n, w in linear_weights(model).items()}
    # give one matrix a heavy-tailed spectrum: WeLore must cut it hardest
    target = "model.layers.0.self_attn.v_proj"
    s = torch.cat([torch.tensor([20.0, 15.0, 10.0]), torch.full((61,), 0.01)]) + torch.linspace(0, 1e-3, 64)
    with torch.no_grad():
        model.get_submodule(target).weight.copy_(with_spectrum(s.sort(descending=True).values, 64, 64).float())
    weights[target] = model.get_submodule(target).weight.detach().clone()
    report = compress(model, 0.3)
    assert report.ranks[target] == min(report.ranks.values())
    assert report.rank_reduction == pytest.approx(0.3, abs=0.02)
    for name in report.lrc:
        k, w = report.ranks[name], weights[name].double()
        layer = model.get_submodule(name)
        sv = torch.linalg.svdvals(w)
        err = torch.linalg.matrix_norm(layer.weight.double() - w)
        assert err.item() == pytest.approx(sv[k:].square().sum().sqrt().item(), rel=1e-3, abs=1e-5)  # Eckart-Young
        out_f, in_f = w.shape
        assert isinstance(layer, LowRankLinear) == (k * (out_f + in_f) < out_f * in_f)
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert len(lrc_parameters(model)) == 2 * n_lowrank > 0
    saved = sum(weights[n].numel() - report.ranks[n] * sum(weights[n].shape) for n in report.lrc
                if isinstance(model.get_submodule(n), LowRankLinear))
    assert report.params_before - report.params_after == saved


def test_low_rank_linear_and_densify_preserve_the_function():
    model = small_llama(seed=1)
    batch = random_batches(1)[0]
    compress(model, 0.6, min_ratio=0.5)
    low = _logits(model, batch)
    x = torch.randn(3, 32)
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    torch.testing.assert_close(layer(x), x @ (layer.B @ layer.A).T)
    densify(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, batch), low, rtol=1e-4, atol=1e-5)


def test_min_ratio_keeps_weakly_compressible_matrices_dense():
    model = small_llama(seed=2)
    report = compress(model, 0.2, min_ratio=0.9)
    assert report.lrc == [] and report.params_after == report.params_before


def test_bad_inputs():
    model = small_llama()
    with pytest.raises(RankwiseError, match="ratio"):
        compress(model, 1.0)
    with pytest.raises(RankwiseError, match="min_ratio"):
        compress(model, 0.5, min_ratio=-0.1)
    with pytest.raises(RankwiseError, match="rank rule"):
        compress(model, 0.5, rank_rule="magic")
    with pytest.raises(RankwiseError, match="no matrix"):
        welore_ranks({}, 0.5)
