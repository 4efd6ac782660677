"""``rankwise bench``: the smoke run writes every file with sane values; presets, budget planning, bad input."""

from __future__ import annotations

import csv
import json
import math

import pytest

from rankwise.bench import BenchConfig, parse_size, plan, run_bench
from rankwise.bench.runner import resolve, select_by_budget
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.models import build_model, count_params

SMALL = {"batch_size": 2, "seq_len": 32, "eval_batches": 2}


def test_bench_smoke_two_methods_twenty_steps_writes_every_file(corpus, tmp_path):
    rows = run_bench(BenchConfig(methods=["full", "lowrank-rr:rank=16,refactor_every=10"], steps=20, out=str(tmp_path),
                                 overrides=SMALL), log=lambda _: None)
    for name in ("results.csv", "results.md", "bench.json", "ppl_vs_memory.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("ppl_vs_memory.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["label"] for r in table] == ["full", "lowrank-rr:rank=16,refactor_every=10"]
    assert all(r["status"] == "ok" for r in table)
    full, lowrank = rows
    n_full = count_params(build_model("tiny", device="meta"))[0]
    assert full["trainable_params"] == n_full and lowrank["trainable_params"] < n_full
    assert json.loads(table[1]["options"]) == {"rank": 16, "refactor_every": 10, "reset_moments": True}
    # AdamW state is exactly two fp32 moments and a fp32 step per parameter tensor
    n_tensors = len(list(build_model("tiny", device="meta").parameters()))
    assert full["optimizer_state_bytes"] == full["final_optimizer_state_bytes"] == 8 * n_full + 4 * n_tensors
    # lowrank-rr dropped its factors' state at step 20: the table reports the steady-state size
    n_low = lowrank["trainable_params"]
    steady = 8 * n_low + 4 * (n_tensors + 4 * 7)  # each of the 4 x 7 target weights became two factors
    assert lowrank["final_optimizer_state_bytes"] < lowrank["optimizer_state_bytes"] == steady
    for r in rows:
        assert r["tokens"] == 20 * 2 * 32  # same tokens for every method
        assert math.isfinite(r["eval_ppl"]) and 1 < r["eval_ppl"] < math.exp(r["initial_eval_loss"])
        assert r["train_mem_bytes"] == r["weights_bytes"] + r["grads_bytes"] + r["optimizer_state_bytes"]
        assert r["tokens_per_s"] > 0 and len(r["history"]) == 20
    md = (tmp_path / "results.md").read_text()
    assert "| full |" in md and "lowrank-rr:rank=16,refactor_every=10" in md and "- torch:" in md and '"steps": 20' in md


def test_parse_size_reads_binary_units():
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24g") == 24 * 2**30
    assert parse_size("512 MB") == 512 * 2**20 and parse_size("1.5G") == 3 * 2**29
    with pytest.raises(RankwiseError, match="e.g. 24GB"):
        parse_size("lots")


def test_plan_counts_weights_grads_and_optimizer_state_from_shapes():
    n = count_params(build_model("tiny", device="meta"))[0]
    tensors = len(list(build_model("tiny", device="meta").parameters()))
    buffers = sum(b.numel() * b.element_size() for b in build_model("tiny", device="meta").buffers())
    full = plan("tiny", "full", {})
    assert (full.weights, full.grads, full.optimizer_state) == (4 * n + buffers, 4 * n, 8 * n + 4 * tensors)
    relora = plan("tiny", "relora", {"rank": 16})
    assert relora.weights > full.weights and relora.grads < full.grads  # frozen W kept, not trained
    big_full, big_galore = plan("llama-1b", "full", {}), plan("llama-1b", "galore", {"rank": 512})
    assert big_galore.optimizer_state < big_full.optimizer_state / 2
    assert big_galore.weights == big_full.weights


def test_budget_keeps_only_methods_that_fit():
    preset, entries = resolve(BenchConfig(methods=["full", "lowrank:rank=8"]))
    full, low = plan("tiny", "full", {}).total, plan("tiny", "lowrank", {"rank": 8}).total
    skipped = []
    fits, planned = select_by_budget(preset, entries, f"{(full + low) // 2 // 2**10}KB", skipped.append)
    assert [e.label for e in fits] == ["lowrank:rank=8"] and planned == {"full": full, "lowrank:rank=8": low}
    assert len(skipped) == 1 and skipped[0].startswith("skip full")
    with pytest.raises(RankwiseError, match="no method fits in 1MB"):
        select_by_budget(preset, entries, "1MB", skipped.append)


def test_resolve_applies_rank_and_steps_and_validates():
    preset, entries = resolve(BenchConfig(steps=30, rank=8))
    assert [e.label for e in entries] == ["full", "galore", "fira", "frugal", "lowrank", "lowrank-rr", "relora",
                                          "sltrain"]
    assert preset.steps == 30 and preset.warmup_steps == 3  # the preset's 10% warmup
    assert entries[0].spec.options == {} and all(e.spec.options["rank"] == 8 for e in entries[1:])
    assert entries[1].spec.lr_scale == 4.0
    for methods, message in [(["nope"], "unknown method 'nope'"), (["full", "full"], "names a method twice"),
                             (["lowrank:density=0.1"], "does not take option"), (["sltrain:density=2"], "density"),
                             (["galore:rank"], "not KEY=VALUE")]:
        with pytest.raises(RankwiseError, match=message):
            resolve(BenchConfig(methods=methods))
    with pytest.raises(RankwiseError, match="valid presets: tiny, llama-60m"):
        resolve(BenchConfig(preset="huge"))
    with pytest.raises(RankwiseError, match="steps must be a positive"):
        resolve(BenchConfig(steps=0))


def test_cli_reports_bad_input_in_one_line(capsys, tmp_path):
    assert main(["bench", "--methods", "full,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankwise bench: error: unknown method 'nope'") and "\n" not in err
    assert main(["bench", "--budget", "big", "--out", str(tmp_path)]) == 2
    assert "cannot read memory size 'big'" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_cli_method_specs_take_colon_separated_options():
    from rankwise.cli.bench import _split_methods

    assert _split_methods("full, galore:rank=32:update_gap=100,relora") == [
        "full", "galore:rank=32,update_gap=100", "relora"]
    _, entries = resolve(BenchConfig(methods=_split_methods("galore:rank=32:update_gap=100")))
    assert entries[0].spec.options == {"rank": 32, "update_gap": 100, "scale": 0.25}
    _, entries = resolve(BenchConfig(methods=["full:lr_scale=4", "galore:lr_scale=1"]))
    assert [(e.spec.options, e.spec.lr_scale) for e in entries] == [({}, 4.0), (entries[1].spec.options, 1.0)]
    with pytest.raises(RankwiseError, match="lr_scale must be a positive number"):
        resolve(BenchConfig(methods=["full:lr_scale=-1"]))
