import json
import math
import os

import pytest
import torch
from rankwise_testing import quick_config

from rankwise import checkpoint
from rankwise.errors import RankwiseError
from rankwise.train import cosine_with_warmup, train

METRIC_KEYS = {"final_eval_loss", "eval_ppl", "tokens_per_s", "peak_mem_bytes", "optimizer_state_bytes",
               "trainable_params", "total_params", "steps", "method", "config", "initial_eval_loss"}


def test_full_rank_training_lowers_validation_loss_and_reports_honest_metrics(corpus, tmp_path):
    out = tmp_path / "run"
    res = train(quick_config(steps=60, eval_every=30, out=str(out)), corpus=corpus)
    m = res.metrics
    assert m["initial_eval_loss"] > 8.5  # ~ln(8192) = 9.01 at random init
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 2.0, m
    assert math.isclose(m["eval_ppl"], math.exp(m["final_eval_loss"]))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(on_disk)
    assert on_disk["final_eval_loss"] == m["final_eval_loss"]
    # AdamW holds exp_avg + exp_avg_sq (fp32) per parameter, and one fp32 `step` scalar per parameter tensor
    tensors = sum(1 for p in res.model.parameters() if p.requires_grad)
    assert m["optimizer_state_bytes"] == 2 * 4 * m["trainable_params"] + 4 * tensors
    assert m["trainable_params"] == m["total_params"] == sum(p.numel() for p in res.model.parameters())
    assert m["tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0 and m["steps"] == 60
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(61))
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[5])
    assert rows[30]["eval_loss"] < rows[0]["eval_loss"]
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert (out / checkpoint.CHECKPOINT_FILE).exists()


def test_resume_is_bit_exact(corpus, tmp_path):
    cfg = dict(steps=8, warmup_steps=2, eval_every=4)
    straight = train(quick_config(**cfg), corpus=corpus)
    first = train(quick_config(**cfg, stop_at=4, out=str(tmp_path)), corpus=corpus)
    second = train(quick_config(**cfg, out=str(tmp_path), resume=str(tmp_path)), corpus=corpus)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in first.history + second.history]
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert straight.metrics["final_eval_loss"] == second.metrics["final_eval_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9))


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # (checkpoint.load would refuse this dict: it lacks a run's keys)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RankwiseError, match="corrupt"):
        checkpoint.load(tmp_path)
    with pytest.raises(RankwiseError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing")


def test_cosine_schedule():
    assert cosine_with_warmup(0, 10, 100, 0.1) == pytest.approx(1 / 11)
    assert cosine_with_warmup(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert cosine_with_warmup(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_grad_accumulation_and_bf16_run(corpus):
    res = train(quick_config(steps=3, batch_size=4, grad_accum=2, dtype="bf16"), corpus=corpus)
    assert res.metrics["tokens"] == 3 * 8 * 64 and math.isfinite(res.metrics["final_eval_loss"])


def test_any_transformers_causal_lm_trains(corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=corpus.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=128))
    res = train(quick_config(steps=15, lr=3e-3), model=model, corpus=corpus)
    assert res.metrics["final_eval_loss"] < res.metrics["initial_eval_loss"] - 0.5


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(seq_len=4096), "larger than the model's 1024 positions"),
    (dict(method="nope"), "unknown method 'nope'; valid methods: full"),
    (dict(preset="huge"), "unknown model preset 'huge'"),
    (dict(dtype="fp8"), "unknown dtype"),
])
def test_bad_config_is_one_clear_error_and_writes_nothing(corpus, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(RankwiseError, match=message):
        train(quick_config(out=str(out), **overrides), corpus=corpus)
    assert not out.exists()
