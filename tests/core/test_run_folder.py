"""The run folder: stale temp files go at start / resume, a run is never overwritten silently, a resume that would
change the computation is refused, and a longer ``--steps`` keeps (default) or stretches (``--extend``) the
schedule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reliability_helpers import fresh, micro_config, micro_model, rows, same_weights, write_micro_preset

from rankwise import checkpoint
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.train import cosine_with_warmup, train


@pytest.fixture(scope="module")
def model0(corpus):
    return micro_model(corpus.vocab_size)


def test_stale_temp_files_are_removed_on_start_and_resume(corpus, model0, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"x" * 1000)  # what a kill -9 mid-write leaves
    (out / ".metrics.json.def456.tmp").write_text("{")
    (out / "notes.txt").write_text("mine")
    train(micro_config(out=str(out), stop_at=2), model=fresh(model0), corpus=corpus)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "notes.txt").read_text() == "mine"
    (out / ".checkpoint.pt.zzz.tmp").write_bytes(b"x")
    (out / "checkpoint_dcp-1").mkdir()  # an FSDP folder no checkpoint names
    train(micro_config(out=str(out), resume=str(out)), model=fresh(model0), corpus=corpus)
    assert not (out / ".checkpoint.pt.zzz.tmp").exists() and not (out / "checkpoint_dcp-1").exists()


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_nothing_after_the_next_start(corpus, tmp_path, rankwise_cache):
    preset = write_micro_preset(tmp_path / "micro", corpus.vocab_size)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, torch
        real = torch.save
        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == 2:
                f.write(b"half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = save
        from rankwise.cli.main import main
        main(["train", "--preset", {preset!r}, "--steps", "4", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--dtype", "fp32", "--checkpoint-every", "1", "--quiet", "--out", {str(out)!r}])
    """)
    env = {**os.environ, "RANKWISE_CACHE": str(rankwise_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "the kill left no temp file to clean"
    assert checkpoint.load(out)["step"] == 1
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    assert checkpoint.load(out)["step"] == 4


def test_a_run_is_not_overwritten_without_overwrite(corpus, model0, tmp_path):
    out = tmp_path / "run"
    train(micro_config(out=str(out), steps=3), model=fresh(model0), corpus=corpus)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RankwiseError, match="already holds a run.*--resume.*--overwrite"):
        train(micro_config(out=str(out), steps=2), model=fresh(model0), corpus=corpus)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train(micro_config(out=str(out), steps=2, overwrite=True), model=fresh(model0), corpus=corpus)
    assert [r["step"] for r in rows(out)] == [0, 1, 2] and checkpoint.load(out)["step"] == 2


def test_resume_refuses_settings_that_change_the_computation(corpus, model0, tmp_path):
    out = tmp_path / "run"
    train(micro_config(out=str(out), stop_at=2), model=fresh(model0), corpus=corpus)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    for change, name in [(dict(seq_len=8), "seq_len"), (dict(lr=1e-2), "lr"), (dict(batch_size=4), "batch_size"),
                         (dict(betas=(0.8, 0.9)), "betas"),
                         (dict(warmup_steps=0), "warmup_steps"), (dict(seed=1), "seed")]:
        with pytest.raises(RankwiseError, match=rf"the run used {name}=.*--allow-change {name}"):
            train(micro_config(out=str(out), resume=str(out), **change), model=fresh(model0), corpus=corpus)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    res = train(micro_config(out=str(out), resume=str(out), lr=1e-2, allow_change=("lr",)), model=fresh(model0),
                corpus=corpus)
    assert res.history[0]["step"] == 3 and res.optimizer.param_groups[0]["initial_lr"] == 1e-2


def test_resume_with_another_method_is_one_clear_error(corpus, tmp_path, capsys):
    preset = write_micro_preset(tmp_path / "micro", corpus.vocab_size)
    out = tmp_path / "run"
    args = ["--preset", preset, "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--dtype", "fp32", "--quiet"]
    assert main(["train", *args, "--stop-at", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--method", "galore", "--rank", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method='full'" in err and "--allow-change method" in err
    assert main(["train", "--resume", str(out), "--method", "lora", "--allow-change", "method"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not fit this model / method" in err, err


def test_longer_steps_keep_the_schedule_by_default_and_extend_stretches_it(corpus, model0, tmp_path):
    lr, warmup, floor = 3e-3, 2, 0.1
    keep, ext = tmp_path / "keep", tmp_path / "extend"
    for out in (keep, ext):
        train(micro_config(out=str(out), steps=4), model=fresh(model0), corpus=corpus)
    kept = train(micro_config(out=str(keep), steps=8, resume=str(keep)), model=fresh(model0), corpus=corpus)
    # default == a straight 8-step run whose schedule ends at step 4: bit-exact, lr stays at the floor after it
    straight = train(micro_config(steps=8, schedule_steps=4), model=fresh(model0), corpus=corpus)
    assert same_weights(kept.model, straight.model)
    assert [r["loss"] for r in rows(keep)[1:]] == [r["loss"] for r in straight.history]
    assert [r["lr"] for r in kept.history] == pytest.approx([lr * floor] * 4)
    assert checkpoint.load(keep)["config"]["schedule_steps"] == 4
    extended = train(micro_config(out=str(ext), steps=8, resume=str(ext), extend=True), model=fresh(model0),
                     corpus=corpus)
    # --extend: the cosine is re-fit to 8 steps, so the lr jumps up from the floor at the resume point
    expected = [lr * cosine_with_warmup(s, warmup, 8, floor) for s in range(4, 8)]
    assert [r["lr"] for r in extended.history] == pytest.approx(expected)
    assert expected[0] > 2 * lr * floor
    assert not same_weights(extended.model, kept.model)


def test_files_respect_the_umask(corpus, model0, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(micro_config(out=str(out), steps=2), model=fresh(model0), corpus=corpus)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and all(m == 0o640 for m in modes.values()), modes
    torch.save({}, tmp_path / "plain.pt")  # what a plain open() would give, under the default umask
    from rankwise.atomic import write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "plain.pt").stat().st_mode & 0o777
