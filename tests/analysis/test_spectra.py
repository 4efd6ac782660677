import math

import pytest
import torch

from rankwise.analysis.spectra import (batched_svdvals, effective_rank, energy_rank, principal_angles,
                                       spectrum_metrics, stable_rank, subspace_overlap)
from rankwise.errors import RankwiseError

from analysis_helpers import with_spectrum


def test_batched_svdvals_match_torch_per_matrix():
    g = torch.Generator().manual_seed(0)
    mats = {"a": torch.randn(12, 7, generator=g), "b": torch.randn(12, 7, generator=g),
            "c": torch.randn(5, 9, generator=g), "d": torch.randn(12, 7, generator=g) * 100}
    out = batched_svdvals(mats)
    assert set(out) == set(mats)
    for n, m in mats.items():
        torch.testing.assert_close(out[n], torch.linalg.svdvals(m), rtol=1e-5, atol=1e-5)


def test_batched_svdvals_rejects_non_matrices():
    with pytest.raises(RankwiseError, match="2-D"):
        batched_svdvals({"x": torch.ones(3)})


def test_effective_rank_of_known_spectra():
    # k equal singular values: p uniform, entropy log k, effective rank k
    for k in (1, 3, 10):
        s = torch.cat([torch.full((k,), 2.5, dtype=torch.float64), torch.zeros(10 - k, dtype=torch.float64)])
        assert effective_rank(s).item() == pytest.approx(k, rel=1e-12)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)  # p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(s).item() == pytest.approx(expected, rel=1e-12)
    assert effective_rank(torch.zeros(4)).item() == 0.0


def test_energy_and_stable_rank_from_a_matrix_with_known_spectrum():
    s = torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64)   # energies 4, 1, 1, 0 of 6
    w = with_spectrum(s, 9, 4)
    sv = torch.linalg.svdvals(w)
    assert energy_rank(sv, 0.5).item() == 1      # 4/6 >= 0.5
    assert energy_rank(sv, 0.8).item() == 2      # 5/6
    assert energy_rank(sv, 0.9).item() == 3      # 6/6
    assert energy_rank(sv, 1.0).item() == 3      # the zero singular value carries no energy
    assert stable_rank(sv).item() == pytest.approx(6 / 4, rel=1e-10)
    fro, two = torch.linalg.matrix_norm(w), torch.linalg.matrix_norm(w, 2)
    assert stable_rank(sv).item() == pytest.approx((fro / two).item() ** 2, rel=1e-10)
    with pytest.raises(RankwiseError, match="energy fraction"):
        energy_rank(sv, 0.0)


def test_metrics_are_batched():
    s = torch.stack([torch.tensor([1.0, 1.0, 0.0]), torch.tensor([4.0, 2.0, 1.0])])
    m = spectrum_metrics(s)
    for key in ("effective_rank", "energy90_rank", "energy99_rank", "stable_rank"):
        assert m[key].shape == (2,)
        for i in range(2):
            single = spectrum_metrics(s[i])[key]
            assert m[key][i].item() == pytest.approx(single.item())
    assert m["full_rank"].tolist() == [3, 3]


def test_principal_angles_of_constructed_subspaces():
    theta = 0.3
    e = torch.eye(5, dtype=torch.float64)
    u1 = torch.stack([e[0], e[1]], 1)
    u2 = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]], 1)
    angles = principal_angles(u1, u2)
    torch.testing.assert_close(angles, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7, rtol=0)
    assert subspace_overlap(u1, u2).item() == pytest.approx((1 + math.cos(theta) ** 2) / 2)
    assert subspace_overlap(u1, u1).item() == pytest.approx(1.0)
    orth = torch.stack([e[3], e[4]], 1)
    assert subspace_overlap(u1, orth).item() == pytest.approx(0.0)
    torch.testing.assert_close(principal_angles(u1, orth), torch.full((2,), math.pi / 2, dtype=torch.float64))
