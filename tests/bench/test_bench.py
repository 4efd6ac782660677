"""``rankwise bench``: the smoke run writes every file with sane values; presets, budget planning, bad input."""

from __future__ import annotations

import csv
import json
import math

import pytest

from rankwise import methods
from rankwise.bench import BenchConfig, planned_bytes, run_bench
from rankwise.bench.presets import PRESETS, TINY_FRONTIER
from rankwise.bench.runner import resolve, select_by_budget, train_config
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.models import build_model, count_params

SMALL = {"batch_size": 2, "seq_len": 32, "eval_batches": 2}


def test_bench_smoke_two_methods_twenty_steps_writes_every_file(corpus, tmp_path):
    rows = run_bench(BenchConfig(methods=["full", "lowrank-rr:rank=16,refactor_every=10"], steps=20, seeds=1,
                                 out=str(tmp_path), overrides=SMALL), log=lambda _: None)
    for name in ("results.csv", "summary.csv", "results.md", "claims.md", "bench.json", "ppl_vs_memory.png",
                 "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("ppl_vs_memory.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["label"] for r in table] == ["full", "lowrank-rr:rank=16,refactor_every=10"]
    assert all(r["status"] == "ok" for r in table)
    full, lowrank = rows
    n_full = count_params(build_model("mini", vocab_size=2048, device="meta"))[0]  # the tiny bench's model
    assert full["trainable_params"] == n_full and lowrank["trainable_params"] < n_full
    assert json.loads(table[1]["options"]) == {"rank": 16, "refactor_every": 10, "reset_moments": True}
    # AdamW state is exactly two fp32 moments and a fp32 step per parameter tensor
    n_tensors = len(list(build_model("mini", device="meta").parameters()))
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
    assert "| full |" in md and "lowrank-rr:rank=16,refactor_every=10" in md
    assert "- torch:" in md and '"steps": 20' in md


def test_budget_keeps_only_methods_that_fit_the_planner():
    cfg = BenchConfig(methods=["full", "lowrank:rank=8"])
    preset, entries = resolve(cfg)
    configs = {e.label: train_config(preset, e, cfg) for e in entries}
    full = planned_bytes("mini", "full", {}, 8, 128, preset.dtype, 2048)  # the tiny bench: mini model, 8 x 128 tokens
    low = planned_bytes("mini", "lowrank", {"rank": 8}, 8, 128, preset.dtype, 2048)
    # the planner's weights + gradients + AdamW state: the difference is exactly 4 + 4 + 8 bytes per parameter saved
    n_full = count_params(build_model("mini", vocab_size=2048, device="meta"))[0]
    n_low = count_params(methods.get("lowrank", rank=8).prepare(build_model("mini", vocab_size=2048,
                                                                            device="meta")))[0]
    assert full - low == 16 * (n_full - n_low) + 4 * (-4 * 7)  # 28 more step counters for the split factors
    skipped = []
    fits, planned = select_by_budget(configs, entries, f"{(full + low) // 2}", skipped.append)
    assert [e.label for e in fits] == ["lowrank:rank=8"] and planned == {"full": full, "lowrank:rank=8": low}
    assert len(skipped) == 1 and skipped[0].startswith("skip full")
    with pytest.raises(RankwiseError, match="no method fits in 1MiB"):
        select_by_budget(configs, entries, "1MiB", skipped.append)
    big_full = planned_bytes("llama-1b", "full", {}, 16, 256, "bf16", 32000)
    assert planned_bytes("llama-1b", "galore", {"rank": 512}, 16, 256, "bf16", 32000) < big_full


def test_resolve_applies_rank_and_steps_and_validates():
    preset, entries = resolve(BenchConfig(steps=30, rank=8))
    assert [e.label for e in entries] == list(PRESETS["tiny"].default_methods)  # the preset's core, in its order
    assert set(PRESETS["tiny"].default_methods) | set(TINY_FRONTIER) == set(PRESETS["tiny"].methods)
    assert [e.label for e in entries][:2] == ["full", "galore"]
    assert preset.steps == 30 and preset.warmup_steps == 3  # the preset's 10% warmup
    assert entries[0].spec.options == {} and all(e.spec.options["rank"] == 8 for e in entries[1:])
    assert entries[1].spec.lr_mult == 4.0 and entries[1].spec.lr_scale == 1.0  # GaLore's untuned lr: 4x base
    for methods, message in [(["nope"], "unknown method 'nope'"), (["full", "full"], "names a method twice"),
                             (["lowrank:density=0.1"], "does not take option"), (["sltrain:density=2"], "density"),
                             (["galore:rank"], "not KEY=VALUE")]:
        with pytest.raises(RankwiseError, match=message):
            resolve(BenchConfig(methods=methods))
    with pytest.raises(RankwiseError, match="valid presets: tiny, gpu-60m, llama-60m"):
        resolve(BenchConfig(preset="huge"))
    with pytest.raises(RankwiseError, match="steps must be a positive"):
        resolve(BenchConfig(steps=0))


def test_cli_reports_bad_input_in_one_line(capsys, tmp_path):
    assert main(["bench", "--methods", "full,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankwise bench: error: unknown method 'nope'") and "\n" not in err
    assert main(["bench", "--budget", "big", "--out", str(tmp_path)]) == 2
    assert "cannot parse memory budget 'big'" in capsys.readouterr().err
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
