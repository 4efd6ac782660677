"""``--log tensorboard|wandb``: the step metrics through the loggers' own libraries; absent by default; a clear error
naming the extra when the library is missing."""

from __future__ import annotations

import json
import sys

import pytest
from rankwise_testing import quick_config, read_scalars

from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.train import train


def test_tensorboard_event_file_holds_the_loss_of_every_step(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    res = train(quick_config(steps=4, seq_len=32, eval_every=2, eval_batches=1, out=str(out), log="tensorboard"),
                corpus=corpus)
    scalars = read_scalars(out / "tensorboard")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert [s for s, _ in scalars["eval/eval_loss"]] == [0, 2, 4]  # the initial eval is step 0
    assert scalars["final/final_eval_loss"] == [(4, pytest.approx(res.metrics["final_eval_loss"], rel=1e-6))]


def test_no_logger_by_default(corpus, tmp_path):
    out = tmp_path / "run"
    train(quick_config(steps=1, seq_len=32, eval_batches=1, out=str(out)), corpus=corpus)
    assert not (out / "tensorboard").exists()


@pytest.mark.parametrize("kind,extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_library_names_the_extra_before_anything_is_written(tmp_path, monkeypatch, capsys, kind, extra):
    monkeypatch.setitem(sys.modules, kind, None)  # import fails as if not installed
    out = tmp_path / "run"
    with pytest.raises(RankwiseError, match=rf"--log {kind} needs the {extra} package: pip install "
                                            rf"'rankwise\[{extra}\]'"):
        train(quick_config(steps=1, out=str(out), log=kind))
    assert not out.exists()
    assert main(["train", "--steps", "1", "--out", str(out), "--log", kind]) == 2
    assert f"pip install 'rankwise[{extra}]'" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--out", str(tmp_path / "b"), "--log", kind]) == 2
    assert not (tmp_path / "b" / "runs").exists()


def test_log_needs_a_folder(corpus):
    pytest.importorskip("tensorboard")
    with pytest.raises(RankwiseError, match="give --out"):
        train(quick_config(steps=1, log="tensorboard"), corpus=corpus)


def test_wandb_offline_run_logs_the_steps(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(quick_config(steps=2, seq_len=32, eval_batches=1, out=str(out), log="wandb"), corpus=corpus)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
