"""``bench --suite multitask`` talks (progress with ETA on stderr) and keeps what finished when interrupted; a rerun
with the same out trains only what is missing and ends with the rows of an uninterrupted run."""

from __future__ import annotations

import json
import re

import pytest

from rankwise.bench import multitask
from rankwise.bench.multitask import run_multitask_suite, smoke_config
from rankwise.errors import RankwiseError

CFG = smoke_config(methods=("lora", "smora"))


def interrupted_then_resumed(out, monkeypatch, capfd):
    """Ctrl-C while SMoRA trains, then the same call again; (rows, what each part trained, stderr of each)."""
    real_train, calls = multitask.train, []

    def train_then_interrupt(cfg_, **kw):
        calls.append(cfg_.method)
        if cfg_.method == "smora":
            raise KeyboardInterrupt
        return real_train(cfg_, **kw)

    monkeypatch.setattr(multitask, "train", train_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_multitask_suite(CFG, out)
    first, err_first = list(calls), capfd.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    calls.clear()
    monkeypatch.setattr(multitask, "train", lambda cfg_, **kw: calls.append(cfg_.method) or real_train(cfg_, **kw))
    rows = run_multitask_suite(CFG, out)
    return saved, rows, first, calls, err_first, capfd.readouterr().err


def test_interrupted_suite_keeps_partial_results_and_a_rerun_resumes(corpus, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(multitask, "plot_bars", lambda rows, png: None)  # the figures: test_multitask.py
    monkeypatch.setattr(multitask, "plot_routing", lambda *a: None)
    out = tmp_path / "out"
    saved, rows, first, second, err_first, err_second = interrupted_then_resumed(out, monkeypatch, capfd)
    # partial results: the base and lora, marked incomplete
    assert first == ["full", "lora", "smora"]
    assert saved["complete"] is False and [r["method"] for r in saved["rows"]] == ["base", "lora"]
    assert "interrupted: 1 of 2 runs and the base kept" in err_first
    # plain progress lines (stderr is not a terminal here): steps of the whole job, the method, the ETA
    total = CFG.pretrain_steps + 2 * CFG.steps
    assert re.search(rf"multitask: {CFG.pretrain_steps}/{total} steps \(pre-training the base\), elapsed \d+[sm], "
                     rf"ETA (\d+[sm]|\?); base pre-trained", err_first), err_first
    assert re.search(rf"multitask: {CFG.pretrain_steps + CFG.steps}/{total} steps \(lora\), .*; lora done", err_first)
    # the rerun trains only smora, then the results are complete
    assert second == ["smora"] and "resuming from" in err_second
    assert re.search(rf"multitask: {total}/{total} steps \(smora\), elapsed \d+[sm], ETA 0s; smora done", err_second)
    assert [r["method"] for r in rows] == ["base", "lora", "smora"] and rows[:2] == saved["rows"]
    final = json.loads((out / "results.json").read_text())
    assert final["complete"] is True and final["rows"] == json.loads(json.dumps(rows, default=str))
    assert not (out / "results.md").read_text().startswith("**Partial**")


@pytest.mark.slow
def test_resumed_suite_equals_an_uninterrupted_one(corpus, tmp_path, monkeypatch, capfd):
    straight = run_multitask_suite(CFG, tmp_path / "straight")
    _, rows, *_ = interrupted_then_resumed(tmp_path / "out", monkeypatch, capfd)
    assert [r["avg_loss"] for r in rows] == pytest.approx([r["avg_loss"] for r in straight], abs=1e-6)


def test_partial_table_says_so(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(multitask, "plot_bars", lambda rows, png: None)
    row = {"method": "base", "tasks": {"prose": {"loss": 1.0}}, "avg_loss": 1.0, "avg_accuracy": None,
           "activated_params": 0, "trainable_params": 0}
    multitask._write(tmp_path, CFG, [row], 2)
    assert (tmp_path / "results.md").read_text().startswith("**Partial**: 0 of 2 fine-tuning runs finished; rerun")


def test_rerun_with_another_configuration_is_refused(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(multitask, "plot_bars", lambda rows, png: None)
    row = {"method": "base", "tasks": {"prose": {"loss": 1.0}}, "avg_loss": 1.0, "avg_accuracy": None,
           "activated_params": 0, "trainable_params": 0}
    multitask._write(tmp_path, CFG, [row], 2)
    (tmp_path / multitask.BASE_FILE).write_bytes(b"")
    with pytest.raises(RankwiseError, match=r"another configuration \(differs in steps\)"):
        run_multitask_suite(smoke_config(methods=("lora", "smora"), steps=3), tmp_path)
