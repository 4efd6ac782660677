import pytest
import torch
import torch.nn.functional as F

from analysis_helpers import random_batches, small_llama
from rankwise.analysis import analyze_model, linear_weights
from rankwise.errors import RankwiseError


def test_weight_spectra_and_metrics_match_direct_computation():
    model = small_llama()
    report = analyze_model(model)
    weights = linear_weights(model)
    assert "lm_head" not in weights and len(weights) == 2 * 7
    assert [r["name"] for r in report.rows] == list(weights)
    for row in report.rows:
        w = weights[row["name"]].detach()
        s = torch.linalg.svdvals(w)
        torch.testing.assert_close(report.weight_spectra[row["name"]], s, rtol=1e-5, atol=1e-6)
        assert row["full_rank"] == min(w.shape)
        assert row["weight_stable_rank"] == pytest.approx((s.square().sum() / s[0] ** 2).item(), rel=1e-4)
        assert row["weight_energy90_rank"] <= row["weight_energy99_rank"] <= row["full_rank"]
        assert "grad_effective_rank" not in row
    assert "lm_head" in linear_weights(model, include_output=True)


def test_gradient_spectra_are_those_of_the_summed_autograd_gradient():
    model = small_llama(seed=1)
    batches = random_batches(3)
    report = analyze_model(model, batches, rank=4)
    model.zero_grad()
    for b in batches:
        logits = model(input_ids=b[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1)).backward()
    for name, w in linear_weights(model).items():
        torch.testing.assert_close(report.grad_spectra[name], torch.linalg.svdvals(w.grad), rtol=1e-4, atol=1e-7)
    assert report.batches == 3
    row = report.rows[0]
    assert 0.0 <= row["drift_overlap"] <= 1.0 + 1e-6 and 0.0 <= row["drift_max_angle_deg"] <= 90.0


def test_identical_batches_do_not_drift_and_the_model_is_restored():
    model = small_llama(seed=2)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batches(1)[0]
    report = analyze_model(model, [batch, batch, batch], rank=3)
    for row in report.rows:
        assert row["drift_overlap"] == pytest.approx(1.0, abs=1e-4)
        assert row["drift_max_angle_deg"] < 1.0
    assert model.training and not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs():
    model = small_llama()
    with pytest.raises(RankwiseError, match="rank"):
        analyze_model(model, random_batches(2), rank=0)
    with pytest.raises(RankwiseError, match="batch"):
        analyze_model(model, [torch.zeros(5, dtype=torch.long)])
    with pytest.raises(RankwiseError, match="at least one batch"):
        analyze_model(model, [])
    with pytest.raises(RankwiseError, match="no nn.Linear"):
        analyze_model(torch.nn.Sequential(torch.nn.ReLU()))
