"""The bench protocol's logic without training: the tuner on a synthetic bowl, the claims' verdicts, tie-aware ranks,
memory matching against the planner, and validation before the first run."""

from __future__ import annotations

import math

import pytest

from rankwise.bench import BenchConfig, plan_bench
from rankwise.bench.budget import match_rank, parse_budget, train_memory
from rankwise.bench.claims import BEST_OTHER, Claim, check_claims, verdict
from rankwise.bench.report import aggregate
from rankwise.bench.tune import lr_grid, rung_steps, successive_halving
from rankwise.errors import RankwiseError


def test_lr_grid_is_log_spaced_over_the_span_and_rejects_one_point():
    grid = lr_grid(1e-3, 7, 64.0)
    assert grid[-1] / grid[0] == pytest.approx(64.0) and math.sqrt(grid[0] * grid[-1]) == pytest.approx(1e-3)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert all(r == pytest.approx(2.0) for r in ratios)
    for points, span, message in [(1, 64.0, "at least 2 points"), (7, 1.0, "span"), (7, math.inf, "span")]:
        with pytest.raises(RankwiseError, match=message):
            lr_grid(1e-3, points, span)
    assert rung_steps(300, (0.25, 1.0)) == [75, 300]
    with pytest.raises(RankwiseError, match="increase to 1.0"):
        rung_steps(300, (0.5, 0.25))


@pytest.mark.parametrize("optimum", [2.1e-3, 1.3e-4, 7.9e-3])
def test_successive_halving_finds_the_minimum_of_a_synthetic_bowl(optimum):
    """Loss = (ln lr - ln optimum)^2 + a horizon term, noise-free: the tuned lr is the grid point nearest the
    optimum in log space; the first rung runs every lr at the short horizon, the full horizon only ceil(7 / 3)."""
    grid = lr_grid(1e-3, 7, 64.0)
    calls = []

    def bowl(lrs, steps):
        calls.append((list(lrs), steps))
        return [[(math.log(lr) - math.log(optimum)) ** 2 + 10 / steps, 0.0 + (math.log(lr / optimum)) ** 2]
                for lr in lrs]

    best, trials = successive_halving(grid, [75, 300], 3, bowl)
    assert best == min(grid, key=lambda lr: abs(math.log(lr / optimum)))
    assert [(len(lrs), steps) for lrs, steps in calls] == [(7, 75), (3, 300)]
    assert best in calls[1][0] and len(trials) == 10
    assert all(t.sd >= 0 for t in trials)


def test_successive_halving_extends_the_full_horizon_past_a_best_lr_at_its_edge():
    """The short rung's optimum is 8x the full horizon's (short schedules favour larger lrs): the survivors are all
    above the true optimum, so the best full-horizon lr is their smallest; its smaller neighbours then run the full
    horizon one at a time until the best has a full-horizon lr on each side."""
    grid = lr_grid(1e-3, 7, 64.0)  # 1.25e-4 ... 8e-3, factor 2
    optimum = grid[1]
    calls = []

    def biased(lrs, steps):
        calls.append((list(lrs), steps))
        centre = optimum * (8 if steps < 300 else 1)
        return [[(math.log(lr) - math.log(centre)) ** 2] for lr in lrs]

    best, trials = successive_halving(grid, [75, 300], 3, biased)
    assert best == optimum
    assert calls == [(grid, 75), (grid[3:6], 300), ([grid[2]], 300), ([grid[1]], 300), ([grid[0]], 300)]
    assert sorted(t.lr for t in trials if t.steps == 300) == grid[:6]


def test_successive_halving_ignores_diverged_points_and_refuses_an_all_failed_grid():
    grid = [1e-3, 2e-3, 4e-3]

    def diverges_high(lrs, steps):
        return [[math.nan if lr > 3e-3 else -math.log(lr)] for lr in lrs]  # larger lr better until it diverges

    best, _ = successive_halving(grid, [10, 20], 2, diverges_high)
    assert best == 2e-3
    with pytest.raises(RankwiseError, match="every lr of the grid failed"):
        successive_halving(grid, [10], 2, lambda lrs, steps: [[math.inf] for _ in lrs])


def test_verdict_is_a_tie_within_the_seed_spread():
    d, z, v = verdict(100.0, 2.0, 110.0, 2.0, n=3)  # A lower by 10, spread sqrt(8)
    assert d == 10.0 and z == pytest.approx(10 / math.sqrt(8)) and v == "held"
    assert verdict(100.0, 5.0, 104.0, 5.0, n=3)[2] == "tie"  # 4 < sqrt(50)
    assert verdict(100.0, 5.0, 96.0, 5.0, n=3)[2] == "tie"
    assert verdict(110.0, 1.0, 100.0, 1.0, n=3)[2] == "did not hold"
    # "comes close": within 5% of B; 104 vs 1.05 * 100 = 105 is a tie at spread sqrt(2), a hold at spread 0.5
    assert verdict(104.0, 1.0, 100.0, 1.0, n=3, margin=0.05)[2] == "tie"
    assert verdict(104.0, 0.3, 100.0, 0.4, n=3, margin=0.05)[2] == "held"
    assert verdict(100.0, 0.0, 110.0, 0.0, n=1) == (10.0, None, "held (1 seed: no spread)")


def _group(label, ppl, sd, mem, budget=None, n=3):
    return {"group": label if budget is None else f"{label} @ {budget}", "label": label, "budget": budget,
            "ppl_mean": ppl, "ppl_sd": sd, "train_mem_mb": mem, "n": n}


def test_claims_pick_the_comparisons_the_claim_is_about():
    groups = [_group("galore", 100, 1, 80, "80%"), _group("frugal", 90, 1, 79, "80%"),
              _group("galore", 95, 1, 100, "100%"), _group("frugal", 96, 1, 99, "100%"),
              _group("lowrank-rr", 104, 1, 60, "60%"), _group("lowrank-rr", 94, 1, 79, "80%"),
              _group("full", 93, 1, 100, "100%")]
    claims = [Claim("frugal beats galore at equal memory", "s", "frugal", "galore", memory="equal"),
              Claim("rr beats galore at 25% less", "s", "lowrank-rr", "galore", memory="less", ratio=0.75),
              Claim("full is best", "s", "full", BEST_OTHER),
              Claim("relora trails", "s", "full", "relora")]
    rows = check_claims(groups, claims)
    equal = [r for r in rows if r["claim"].startswith("frugal")]
    assert [(r["a"], r["b"], r["verdict"]) for r in equal] == [("frugal @ 80%", "galore @ 80%", "held"),
                                                               ("frugal @ 100%", "galore @ 100%", "tie")]
    less = next(r for r in rows if r["claim"].startswith("rr"))
    assert (less["a"], less["b"]) == ("lowrank-rr @ 60%", "galore @ 80%")  # ratio 0.75 exactly
    assert less["verdict"] == "did not hold"  # 104 vs 100 at spread sqrt(2)
    best = next(r for r in rows if r["claim"] == "full is best")
    assert best["b"] == "frugal @ 80%" and best["verdict"] == "did not hold"
    assert next(r for r in rows if r["claim"] == "relora trails")["verdict"].startswith("not run")


def test_aggregate_means_sds_and_tie_aware_ranks():
    def run(label, seed, ppl):
        return {"group": label, "label": label, "budget": None, "seed": seed, "method": label, "status": "ok",
                "eval_ppl": ppl, "eval_loss": math.log(ppl), "optimizer_state_bytes": 1, "train_mem_bytes": 2,
                "trainable_params": 3, "tokens_per_s": 4.0, "peak_mem_bytes": 5, "history": []}

    rows = [run("a", s, p) for s, p in enumerate([100, 102, 104])] + \
           [run("b", s, p) for s, p in enumerate([103, 104, 105])] + \
           [run("c", s, p) for s, p in enumerate([120, 121, 122])] + \
           [{"group": "d", "label": "d", "seed": 0, "method": "d", "status": "failed: boom"}]
    groups = {g["group"]: g for g in aggregate(rows)}
    assert set(groups) == {"a", "b", "c"}  # a method with no finished run has no row
    assert groups["a"]["ppl_mean"] == 102 and groups["a"]["ppl_sd"] == pytest.approx(2.0)
    assert groups["b"]["ppl_sd"] == pytest.approx(1.0) and groups["a"]["n"] == 3
    # a and b differ by 2 < sqrt(4 + 1): a tie for first; c is worse than both by more than the spread
    assert (groups["a"]["rank_of"], groups["b"]["rank_of"], groups["c"]["rank_of"]) == ("=1", "=1", "3")


def test_match_memory_lands_within_tolerance_of_the_planned_size():
    full = train_memory("mini", "full", {}, "bf16", 2048)
    for method, options, frac in [("galore", {"update_gap": 100, "scale": 0.25}, 0.8), ("sltrain", {}, 1.0),
                                  ("relora", {}, 0.6)]:
        if True:
            target = int(frac * full)
            m = match_rank("mini", method, options, target, "bf16", 2048, tolerance=0.05)
            assert m.ok and m.rank is not None, (method, frac, m.reason)
            # the planner's count at the chosen rank, recomputed independently, is within 5% (in fact ~0.3%)
            again = train_memory("mini", method, {**options, "rank": m.rank}, "bf16", 2048)
            assert again == m.bytes and abs(again / target - 1) <= 0.05
            # and no other rank is closer
            for r in (m.rank - 1, m.rank + 1):
                if r >= 1:
                    assert abs(train_memory("mini", method, {**options, "rank": r}, "bf16", 2048) - target) >= \
                           abs(m.bytes - target)
    low = match_rank("mini", "galore", {}, int(0.5 * full), "bf16", 2048)
    assert not low.ok and "even rank 1 needs" in low.reason  # GaLore keeps full weights and gradients
    assert match_rank("mini", "full", {}, full, "bf16", 2048).ok
    assert "no rank to tune" in match_rank("mini", "full", {}, int(0.8 * full), "bf16", 2048).reason
    assert parse_budget("80%") == ("fraction", 0.8) and parse_budget("60MiB") == ("bytes", 60 * 2**20)


def test_plan_bench_prints_the_memory_plan_and_skips_methods_that_cannot_reach(capsys):
    lines = []
    bp = plan_bench(BenchConfig(methods=["full", "galore", "lowrank"], match_memory=["100%", "60%"]), lines.append)
    ok = {k: m for k, m in bp.matches.items() if m.ok}
    assert set(ok) == {("full", "100%"), ("galore", "100%"), ("lowrank", "100%"), ("lowrank", "60%")}
    assert {(s["label"], s["budget"]) for s in bp.skipped} == {("full", "60%"), ("galore", "60%")}
    assert any("skipped: cannot reach" in line for line in lines) and any("rank" in line for line in lines)
    assert bp.seeds == [0, 1, 2]  # the tiny preset's 3 seeds
    bp = plan_bench(BenchConfig(methods=["lowrank"], match_memory=["preset"]), lines.append)
    assert bp.budgets == ["100%", "80%", "60%"] and all(m.ok for m in bp.matches.values())


@pytest.mark.parametrize("cfg, message", [
    (BenchConfig(methods=["galore:rank=abc"]),
     r"option rank='abc' of 'galore:rank=abc' must be an integer \(default 128\); e.g. galore:rank=128"),
    (BenchConfig(methods=["galore:scale=high"]), "must be a finite number"),
    (BenchConfig(methods=["galore:nope=1"]), "does not take option"),
    (BenchConfig(methods=["lowrank:rank=0"]), "rank must be a positive integer"),
    (BenchConfig(rank=0), "--rank must be a positive integer"),
    (BenchConfig(methods=["lowrank:rank=4096"]), r"rank must be in \[1, 127\]"),
    (BenchConfig(overrides={"seq_len": 5000}),
     "seq_len 5000 is longer than the 1024 positions of model 'mini'; use --seq-len 1024"),
    (BenchConfig(seeds=0), "--seeds must be a positive integer"),
    (BenchConfig(tune=True, tune_points=1), "at least 2 points"),
    (BenchConfig(match_memory=["1MiB"]), "no method can reach --match-memory 1MiB"),
    (BenchConfig(match_memory=["1MiB"], budget="1GiB"), "give one of them"),
    (BenchConfig(overrides={"lr": math.inf}), "--lr must be a positive finite number"),
    (BenchConfig(methods=["full:lr_scale=0"]), "lr_scale must be a positive number"),
])
def test_bad_input_is_one_clear_error_before_any_run(cfg, message):
    with pytest.raises(RankwiseError, match=message):
        plan_bench(cfg, lambda _: None)
