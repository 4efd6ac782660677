"""The presets inside the training loop and the CLI: they train, resume bit-exactly, and report their state."""

from __future__ import annotations

import json

import pytest
import torch
from rankwise_testing import quick_config

from rankwise import methods
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.train import train

PRESETS = {"full": {}, "galore": {"rank": 32}, "fira": {"rank": 32}, "frugal": {"rank": 32}, "badam": {},
           "lisa": {}, "apollo": {"rank": 32}, "apollo-mini": {}}


@pytest.mark.parametrize("method", PRESETS)
def test_every_preset_lowers_validation_loss(corpus, method):
    steps = 10
    res = train(quick_config(method=method, method_options=PRESETS[method], steps=steps, batch_size=4, seq_len=32,
                             lr=3e-3, warmup_steps=2, eval_batches=2), corpus=corpus)
    m = res.metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.3
    if method != "full":  # the loop's measured state bytes == the closed form (period of the last step)
        period = (steps - 1) // res.optimizer.param_groups[0]["update_gap"]
        assert m["optimizer_state_bytes"] == res.optimizer.expected_state_bytes(period)


def test_frugal_coordinates_resume_through_checkpoint_is_bit_exact(corpus, tmp_path):
    """stop + resume via the loop's checkpoint (int64 indices, Python-int counters, projector bases) == one run."""
    cfg = dict(method="frugal", method_options={"rank": 16, "projector": "coordinates", "update_gap": 3}, steps=7,
               batch_size=4, seq_len=32, eval_batches=1)
    straight = train(quick_config(**cfg), corpus=corpus)
    train(quick_config(**cfg, stop_at=4, out=str(tmp_path)), corpus=corpus)
    resumed = train(quick_config(**cfg, out=str(tmp_path), resume=str(tmp_path)), corpus=corpus)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_layerwise_in_the_loop(corpus):
    res = train(quick_config(method="galore", method_options={"rank": 16, "layerwise": True}, steps=6,
                             batch_size=4, seq_len=32, eval_batches=1), corpus=corpus)
    assert res.optimizer.layerwise and all(p.grad is None for p in res.model.parameters())
    assert res.metrics["final_eval_loss"] < res.metrics["initial_eval_loss"]
    assert "grad_norm" not in res.history[-1]  # no gradient survives backward: clipping does not apply


def test_layerwise_with_gradient_accumulation_updates_once_on_the_summed_gradient(corpus):
    """galore-torch #78 updates on every micro-batch; here the hooks wait for the last one: the same weights as the
    step() path with the same accumulation (clipping off: layer-wise mode cannot clip)."""
    runs = [train(quick_config(method="galore", method_options={"rank": 8, "update_gap": 2, "layerwise": lw}, steps=3,
                               batch_size=2, grad_accum=2, seq_len=32, eval_batches=1, grad_clip=0.0), corpus=corpus)
            for lw in (False, True)]
    assert [r["loss"] for r in runs[1].history] == pytest.approx([r["loss"] for r in runs[0].history], rel=1e-6)
    for (name, p), q in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_cli_methods_and_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "fira", "--rank", "8", "--update-gap", "2", "--scale", "0.5", "--opt",
                 "projector=rsvd", "--steps", "3", "--seq-len", "32", "--eval-batches", "1", "--dtype", "fp32",
                 "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "fira"
    assert metrics["config"]["method_options"] == {"rank": 8, "update_gap": 2, "scale": 0.5, "projector": "rsvd"}
    capsys.readouterr()
    assert main(["methods", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert {"galore", "fira", "frugal", "badam", "lisa", "split"} <= names
    assert main(["train", "--method", "galore", "--rank", "999", "--steps", "2", "--quiet"]) == 2
    assert "rank 999 is invalid for model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().err
    with pytest.raises(RankwiseError, match="does not take option"):
        methods.get("badam", rank=4)


def final_loss(corpus, method: str, lr: float = 2e-3, **options) -> tuple[float, float]:
    res = train(quick_config(method=method, method_options={"rank": 64, **options}, steps=200, warmup_steps=20,
                             eval_batches=8, lr=lr), corpus=corpus)
    return res.metrics["initial_eval_loss"], res.metrics["final_eval_loss"]


@pytest.mark.slow
def test_fira_beats_galore_at_200_steps(corpus):
    """Fira's claim at equal rank (tiny preset, 200 steps, seq 64, batch 8, lr 2e-3); numbers in docs/optim.md."""
    initial, galore = final_loss(corpus, "galore")
    _, fira = final_loss(corpus, "fira")
    assert fira < galore < initial


@pytest.mark.slow
@pytest.mark.xfail(reason="FRUGAL's claim does not hold on our data (docs/optim.md): at lr 2e-3 frugal 6.148 vs "
                          "galore 6.146, at lr 1e-2 6.464 vs 6.100 (tiny preset, 200 steps, rank 64)", strict=False)
def test_frugal_beats_galore_at_200_steps(corpus):
    initial, galore = final_loss(corpus, "galore")
    _, frugal = final_loss(corpus, "frugal")
    assert frugal < galore < initial


@pytest.mark.slow
def test_rsvd_refresh_trains_as_well_as_svd_at_200_steps(corpus):
    """The cheap refresh does not cost quality: rsvd's final loss is within 0.01 of exact SVD's (or lower)."""
    _, svd = final_loss(corpus, "galore")
    _, rsvd = final_loss(corpus, "galore", projector="rsvd")
    assert rsvd < svd + 0.01
