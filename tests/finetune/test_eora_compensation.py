"""EoRA (``rankwise.analysis.eora``): the activation-weighted optimum on an exact case (an independent Cholesky
construction), never worse than plain SVD truncation, and ``rankwise compress --eora`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import model_folder, small_model, text_corpus

from rankwise.analysis.eora import compensate, eora_factors, svd_factors
from rankwise.cli.main import main
from rankwise.errors import RankwiseError


def weighted_error(dw: torch.Tensor, m: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm((dw - m) @ x).item()


def optimum(dw: torch.Tensor, x: torch.Tensor, r: int) -> torch.Tensor:
    """Independent oracle: with X X^T = L L^T (Cholesky), ||(dW - M) X||_F = ||(dW - M) L||_F, so the best rank-r M
    is (dW L)_r L^{-1} (Eckart-Young), and its error is the norm of dW L's singular values past r."""
    chol = torch.linalg.cholesky(x @ x.T)
    u, s, vh = torch.linalg.svd(dw @ chol)
    return (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(chol)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_eora_is_the_activation_weighted_optimum_and_beats_svd(r):
    g = torch.Generator().manual_seed(r)
    dw = torch.randn(12, 8, generator=g, dtype=torch.float64)
    x = torch.randn(8, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 8, dtype=torch.float64)[:, None]
    b, a = eora_factors(dw, x @ x.T, r)
    assert b.shape == (12, r) and a.shape == (r, 8)
    best = optimum(dw, x, r)
    assert torch.allclose(b @ a, best, atol=1e-8)
    tail = torch.linalg.svdvals(dw @ torch.linalg.cholesky(x @ x.T))[r:].norm().item()
    assert weighted_error(dw, b @ a, x) == pytest.approx(tail, rel=1e-9)
    bs, as_ = svd_factors(dw, r)
    assert weighted_error(dw, b @ a, x) <= weighted_error(dw, bs @ as_, x) + 1e-12
    assert torch.linalg.matrix_norm(dw - bs @ as_) <= torch.linalg.matrix_norm(dw - b @ a) + 1e-12


def test_full_rank_compensation_is_exact_and_a_singular_gram_is_handled():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x = torch.randn(5, 30, generator=g, dtype=torch.float64)
    b, a = eora_factors(dw, x @ x.T, 5)
    assert torch.allclose(b @ a, dw, atol=1e-9)
    x[4] = 0  # a dead input channel: its eigenvalue 0 is raised to the smallest positive one
    b, a = eora_factors(dw, x @ x.T, 2)
    assert torch.isfinite(b @ a).all()
    # it is then the exact optimum for the raised second moment Q max(Lambda, lambda_min+) Q^T
    lam, q = torch.linalg.eigh(x @ x.T)
    raised = (q * torch.where(lam > 1e-9, lam, lam[lam > 1e-9].min())) @ q.T
    assert torch.allclose(b @ a, optimum(dw, torch.linalg.cholesky(raised), 2), atol=1e-7)
    with pytest.raises(RankwiseError, match="positive integer"):
        eora_factors(dw, x @ x.T, 0)


def test_compensate_lowers_each_layers_output_error_on_a_quantized_model():
    from rankwise import quant

    model = small_model()
    compressed = quant.quantize_base(small_model().requires_grad_(False), "nf4")
    names = list(quant.quantized_layers(compressed))
    batches = [torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    eigen = compensate(model, {n: compressed.get_submodule(n) for n in names}, batches, 4)
    assert eigen.weighted_error_after < eigen.weighted_error_before
    other = quant.quantize_base(small_model().requires_grad_(False), "nf4")
    svd = compensate(small_model(), {n: other.get_submodule(n) for n in names}, batches, 4, method="svd")
    assert eigen.weighted_error_after < svd.weighted_error_after  # EoRA beats plain SVD on the activations


@pytest.mark.parametrize("flags", [["--quantize", "nf4"], ["--ratio", "0.5"]])
def test_compress_eora_cli_writes_model_and_peft_adapter(tmp_path, capsys, flags):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, data = model_folder(tmp_path / "base"), text_corpus(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    assert main(["compress", "--model", base, *flags, "--eora", "4", "--data", data, "--vocab-size", "300",
                 "--eval-batches", "1", "--calib-batches", "2", "--seq-len", "32", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eora_weighted_error_after"] < result["eora_weighted_error_before"]
    assert {"ppl_before", "ppl_after", "ppl_eora", "eora_recovery"} <= set(result)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)), str(out / "eora"))
    assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.isfinite().all()


def test_compress_bad_input(tmp_path, capsys):
    base = model_folder(tmp_path / "base")
    assert main(["compress", "--model", base, "--eval-batches", "0"]) == 2
    assert "nothing to compress" in capsys.readouterr().err
    assert main(["compress", "--model", base, "--quantize", "nf4", "--eora", "0"]) == 2
    assert "--eora RANK" in capsys.readouterr().err
