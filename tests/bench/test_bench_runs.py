"""The bench protocol on real (micro) runs, in this process: seeds change init and data, the tuner's end-to-end
outputs, matched memory as measured, resume (finished runs kept, unfinished redone, same table), and the CLI's bad
input (exit 2, one line, OUT untouched)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from rankwise.bench import BenchConfig, run_bench
from rankwise.bench import presets as bench_presets
from rankwise.bench import runner
from rankwise.bench import report as runner_report
from rankwise.bench.budget import train_memory
from rankwise.cli.main import main
from rankwise.data import Batches, prepare
from rankwise.errors import RankwiseError
from rankwise.models import build_model

# a test-only regime: the mini model for a handful of steps on 2 x 32-token batches
MICRO = bench_presets.BenchPreset(
    model="mini", steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
    methods=bench_presets._cpu_methods(rank=8, gap=2, warmup=1), eval_every=4, eval_batches=2, vocab_size=2048,
    seeds=2, tune_points=3, tune_span=32.0, tune_rungs=(0.5, 1.0), tune_eta=3, description="test-only micro regime")


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    monkeypatch.setitem(bench_presets.PRESETS, "micro", MICRO)


def _quiet(_: str) -> None:
    pass


def test_seeds_change_model_init_and_data_order(tmp_path):
    rows = run_bench(BenchConfig(preset="micro", methods=["full"], seeds=2, seed=5, out=str(tmp_path),
                                 isolate=False), _quiet)
    assert [r["seed"] for r in rows] == [5, 6] and all(r["status"] == "ok" for r in rows)
    configs = [json.loads((tmp_path / "runs" / "full" / "default" / f"seed{s}" / "job.json").read_text())["config"]
               for s in (5, 6)]
    assert configs[0]["seed"] == 5 and configs[1]["seed"] == 6
    assert {k: v for k, v in configs[0].items() if k != "seed"} == {k: v for k, v in configs[1].items() if k != "seed"}
    # the seed moves both the init (same validation tokens, different initial loss) and the training batches
    assert rows[0]["initial_eval_loss"] != rows[1]["initial_eval_loss"]
    a, b = (build_model("mini", vocab_size=2048, seed=s) for s in (5, 6))
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    corpus = prepare("stdlib-docs", 2048)
    batches = [Batches(corpus.train, 2, 32, s).train_batch(0) for s in (5, 6)]
    assert not torch.equal(*batches)
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert summary[0]["n"] == "2" and float(summary[0]["ppl_sd"]) > 0
    md = (tmp_path / "results.md").read_text()
    assert "± " in md and "| ref | unigram |" in md and "## Claims" in md
    assert (tmp_path / "claims.md").read_text().count("\n|") >= 8
    for name in ("ppl_vs_memory.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_then_bench_at_the_tuned_lrs(tmp_path, monkeypatch):
    rows = run_bench(BenchConfig(preset="micro", methods=["full", "galore"], seeds=1, tune=True, out=str(tmp_path),
                                 isolate=False), _quiet)
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["successive_halving"]["horizons"] == [2, 4]
    for name, lr_mult in (("full", 1.0), ("galore", 4.0)):
        m = tuned["methods"][name]
        grid = sorted({t["lr"] for t in m["sweep"]})
        assert len(grid) == 3 and grid[-1] / grid[0] == pytest.approx(32.0)
        assert grid[1] == pytest.approx(3e-3 * lr_mult)  # centred on the preset's lr
        steps = [t["steps"] for t in m["sweep"]]
        assert steps[:4] == [2, 2, 2, 4]  # 3 lrs on the short rung, ceil(3/3) at full length ...
        final = sorted((t for t in m["sweep"] if t["steps"] == 4), key=lambda t: t["lr"])
        assert 2 <= len(final) <= 3 and steps[4:] == [4] * (len(final) - 1)  # ... then its neighbours (edge rule)
        best = min(final, key=lambda t: (t["mean"], t["lr"]))
        assert m["lr"] == best["lr"] and m["tuned"] == ["lr"]
        at_grid_end = best["lr"] in (grid[0], grid[-1])
        assert at_grid_end or final[0]["lr"] < best["lr"] < final[-1]["lr"]
    assert tuned["methods"]["galore"]["fixed"] == {"scale": 0.25}  # GaLore's scale held at the paper's value
    assert {r["label"]: r["lr"] for r in rows} == {k: v["lr"] for k, v in tuned["methods"].items()}
    assert (tmp_path / "lr_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "results.md").read_text()
    assert "| galore |" in md and "tuned (this run)" in md and "scale=0.25" in md
    # a later bench can take those lrs, and lr_scale multiplies them
    rows = run_bench(BenchConfig(preset="micro", methods=["full:lr_scale=3"], seeds=1,
                                 tuned=str(tmp_path / "tuned.json"), out=str(tmp_path / "again"), isolate=False),
                     _quiet)
    assert rows[0]["lr"] == pytest.approx(3 * tuned["methods"]["full"]["lr"])
    # with --lr the grid is centred on it, and the bench still runs at the lr it tuned
    rows = run_bench(BenchConfig(preset="micro", methods=["full"], seeds=1, tune=True, overrides={"lr": 1e-3},
                                 out=str(tmp_path / "centred"), isolate=False), _quiet)
    sweep = json.loads((tmp_path / "centred" / "tuned.json").read_text())["methods"]["full"]
    assert sorted({t["lr"] for t in sweep["sweep"]})[1] == pytest.approx(1e-3) and rows[0]["lr"] == sweep["lr"]
    # shipping stores the sweep under the preset in the package's lrs file, which later benches use by default
    shipped = tmp_path / "tuned_lrs.json"
    shipped.write_text(runner.TUNED_LRS.read_text())
    monkeypatch.setattr(runner, "TUNED_LRS", shipped)
    runner.ship_tuned(tmp_path / "tuned.json", "rankwise bench --preset micro --tune")
    entry = json.loads(shipped.read_text())["presets"]["micro"]
    assert entry["commands"] == ["rankwise bench --preset micro --tune"] and entry["methods"] == tuned["methods"]
    assert runner.load_tuned("micro", None)[0]["galore"]["lr"] == tuned["methods"]["galore"]["lr"]
    # a second sweep of the same protocol adds its methods; one of another protocol replaces the entry
    more = {**tuned, "methods": {"extra": {**tuned["methods"]["full"], "label": "extra"}}}
    (tmp_path / "more.json").write_text(json.dumps(more))
    runner.ship_tuned(tmp_path / "more.json", "second")
    entry = json.loads(shipped.read_text())["presets"]["micro"]
    assert set(entry["methods"]) == {*tuned["methods"], "extra"} and entry["commands"][-1] == "second"
    (tmp_path / "other.json").write_text(json.dumps({**more, "steps": more["steps"] + 1}))
    runner.ship_tuned(tmp_path / "other.json", "third")
    entry = json.loads(shipped.read_text())["presets"]["micro"]
    assert set(entry["methods"]) == {"extra"} and entry["commands"] == ["third"]
    assert runner.load_tuned("not-shipped", None)[0] == {}  # a preset without an entry: its default lrs


def test_matched_memory_as_measured_lands_within_tolerance(tmp_path):
    full = train_memory("mini", "full", {}, "bf16", 2048)
    rows = run_bench(BenchConfig(preset="micro", methods=["full", "lowrank", "galore"], seeds=1, steps=1,
                                 match_memory=["80%"], out=str(tmp_path), isolate=False), _quiet)
    assert {r["label"] for r in rows} == {"lowrank", "galore"}  # full-rank cannot reach 80% of itself
    for r in rows:
        assert r["train_mem_bytes"] == r["matched_mem_bytes"]  # the planner's count is what the run measured
        assert abs(r["train_mem_bytes"] / (0.8 * full) - 1) <= 0.05
    assert "full @ 80%: has no rank to tune" in (tmp_path / "results.md").read_text()


def test_resume_keeps_finished_runs_and_redoes_unfinished_ones(tmp_path):
    cfg = BenchConfig(preset="micro", methods=["full", "lowrank"], seeds=1, out=str(tmp_path), isolate=False)
    first = run_bench(cfg, _quiet)
    kept = tmp_path / "runs" / "full" / "default" / "seed0" / "result.json"
    redo = tmp_path / "runs" / "lowrank" / "default" / "seed0"
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    (redo / "result.json").unlink()  # as if killed mid-run
    (redo / "metrics-partial.txt").write_text("left by the killed run")
    lines = []
    again = run_bench(cfg, lines.append)
    assert any("resuming: 1 of 2 runs already finished" in line for line in lines)
    assert kept.read_bytes() == kept_bytes and kept.stat().st_mtime_ns == kept_mtime
    assert not (redo / "metrics-partial.txt").exists() and (redo / "result.json").exists()
    assert [(r["label"], r["eval_ppl"]) for r in again] == [(r["label"], r["eval_ppl"]) for r in first]


def test_cli_bad_input_exits_2_in_one_line_and_leaves_out_untouched(capsys, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "micro", "--methods", "full", "--seeds", "1", "--out", str(out),
                 "--in-process"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = [(["--methods", "galore:rank=abc"], "must be an integer"), (["--rank", "0"], "--rank must be a positive"),
           (["--seq-len", "5000"], "positions"), (["--match-memory", "1MiB"], "no method can reach"),
           (["--seeds", "0"], "--seeds must be a positive"), (["--tune", "--tune-points", "1"], "at least 2 points"),
           (["--steps", "3"], "made with another configuration (differs in: setup)"),
           (["--methods", "full,lowrank"], "differs in: methods")]
    for extra, message in bad:
        methods = [] if "--methods" in extra else ["--methods", "full"]
        args = ["bench", "--preset", "micro", *methods, "--seeds", "1", "--out", str(out), "--in-process", *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("rankwise bench: error:") and message in err and "\n" not in err, (extra, err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--preset", "micro", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(RankwiseError, match="not empty and holds no bench_config.json"):
        run_bench(BenchConfig(preset="micro", out=str(tmp_path), isolate=False), _quiet)


def test_a_failing_run_is_a_row_and_a_rerun_redoes_it(tmp_path, monkeypatch):
    calls = []
    real = runner.run_job

    def flaky(job):
        calls.append(job["label"])
        if job["label"] == "lowrank" and calls.count("lowrank") == 1:
            raise RuntimeError("simulated crash")
        return real(job)

    monkeypatch.setattr(runner, "run_job", flaky)
    cfg = BenchConfig(preset="micro", methods=["full", "lowrank"], seeds=1, steps=2, out=str(tmp_path), isolate=False)
    rows = run_bench(cfg, _quiet)
    assert [r["status"] for r in rows] == ["ok", "failed: RuntimeError: simulated crash"]
    assert "lowrank seed 0: failed: RuntimeError: simulated crash" in (tmp_path / "results.md").read_text()
    rows = run_bench(cfg, _quiet)  # the rerun keeps full and redoes lowrank
    assert calls == ["full", "lowrank", "lowrank"] and all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("load", [0.0, 1000.0])
def test_run_lines_carry_the_eta_and_a_loaded_machine_marks_tokens_per_s(tmp_path, monkeypatch, load):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    lines = []
    rows = run_bench(BenchConfig(preset="micro", methods=["full"], seeds=2, out=str(tmp_path), isolate=False),
                     lines.append)
    runs = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in runs] == ["[1/2", "[2/2"]
    assert all(re.search(r"tokens/s, \d+ s\); elapsed \d+s, ETA \d+s$", line) for line in runs), runs
    assert runs[1].endswith("ETA 0s")
    recorded = [(r["load_avg_start"], r["load_avg_end"], r["cpu_count"]) for r in rows]
    assert recorded == [(load, load, os.cpu_count())] * 2
    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| 1 | full |")]
    assert len(table) == 1 and table[0].count(" (loaded) |") == (load > os.cpu_count())
    assert (runner_report.LOADED_NOTE in md) == (load > os.cpu_count())
    # the bench's own threads are not "other work": a load of exactly them (+ less than half the cores) is idle
    own = rows[0]["bench_threads"]
    assert own == torch.get_num_threads()  # in process: this process's threads
    for extra, busy in ((0.4 * os.cpu_count(), False), (0.6 * os.cpu_count(), True)):
        row = {**rows[0], "load_avg_start": own + extra, "load_avg_end": own + extra}
        assert runner_report.loaded(row) == busy


def test_bench_runs_log_into_their_own_folders(tmp_path):
    pytest.importorskip("tensorboard")
    from rankwise_testing import read_scalars

    run_bench(BenchConfig(preset="micro", methods=["full"], seeds=1, steps=2, out=str(tmp_path), isolate=False,
                          overrides={"log": "tensorboard"}), lambda _: None)
    folders = list(tmp_path.glob("runs/*/*/seed*/tensorboard"))
    assert len(folders) == 1 and [s for s, _ in read_scalars(folders[0])["train/loss"]] == [1, 2]
