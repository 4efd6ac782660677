"""LoRA-LEGO: exact reproduction at k = R, unit invariances, merging of several LoRAs, output-norm reweighting."""

import pytest
import torch
from torch import nn

from rankwise.adapters.inject import apply
from rankwise.adapters.moe.lego import canonical_units, kmeans, lego_merge_factors, lora_lego_merge
from rankwise.errors import RankwiseError


def _factors(rank, d_in=16, d_out=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, rank, generator=g, dtype=torch.float64),
            torch.randn(rank, d_in, generator=g, dtype=torch.float64))


def test_one_lora_with_k_equal_rank_is_reproduced():
    b, a = _factors(6)
    bm, am = lego_merge_factors([(b, a, 0.5)], 6)
    torch.testing.assert_close(bm @ am, 0.5 * b @ a)


def test_canonical_units_are_invariant_to_sign_and_rescaling():
    b, a = _factors(4)
    a1, b1 = canonical_units(b, a, 2.0)
    flip = torch.tensor([1.0, -1.0, 3.0, -0.25], dtype=torch.float64)  # (a_i, b_i) -> (f a_i, b_i / f)
    a2, b2 = canonical_units(b / flip, flip[:, None] * a, 2.0)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(a1.norm(dim=1), b1.norm(dim=1))
    torch.testing.assert_close(b1.t() @ a1, 2.0 * b @ a)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    points = centers.repeat_interleave(7, 0) + 0.01 * torch.randn(21, 5, generator=g, dtype=torch.float64)
    assign = kmeans(points, 3)
    assert all(len(set(assign[i * 7:(i + 1) * 7].tolist())) == 1 for i in range(3))
    assert len(set(assign.tolist())) == 3


def test_duplicate_units_across_loras_merge_into_one_rank():
    """Two LoRAs sharing rank-units (up to sign/scale) merge at k = distinct units into their common update."""
    b, a = _factors(3)
    b2, a2 = -2.0 * b, -0.5 * a  # the same three units, re-scaled and sign-flipped
    bm, am = lego_merge_factors([(b, a, 1.0), (b2, a2, 1.0)], 3, reweight=False)
    torch.testing.assert_close(bm @ am, b @ a)


def test_output_norm_reweighting_matches_the_mean_norm():
    (b1, a1), (b2, a2) = _factors(4, seed=1), _factors(4, seed=2)
    x = torch.randn(32, 16, dtype=torch.float64)
    bm, am = lego_merge_factors([(b1, a1, 1.0), (b2, a2, 1.0)], 3, inputs=x)
    target = (torch.linalg.norm(x @ (b1 @ a1).t()) + torch.linalg.norm(x @ (b2 @ a2).t())) / 2
    torch.testing.assert_close(torch.linalg.norm(x @ (bm @ am).t()), target)
    with pytest.raises(RankwiseError, match="k must be"):
        lego_merge_factors([(b1, a1, 1.0)], 5)


def test_lora_lego_merge_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(16, 11))
    apply(model, "lora", r=4, alpha=8.0, target=["q_proj"], adapter_name="task")
    with torch.no_grad():
        model.q_proj.adapters["task"].lora_B.normal_()
    expected = model.q_proj.adapters["task"].delta_weight()
    lora_lego_merge(model, ["task"], k=4)
    torch.testing.assert_close(model.q_proj.adapters["lego"].delta_weight(), expected)
    assert model.q_proj.active == ["lego"]
    with pytest.raises(RankwiseError, match="none of the adapters"):
        lora_lego_merge(model, ["missing"], k=2)
