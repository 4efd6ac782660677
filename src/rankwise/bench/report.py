"""Benchmark outputs, each written atomically: ``results.csv`` (one row per run), ``summary.csv`` (mean and sd over
seeds per method and budget), ``results.md`` (the table with reference rows, the claims, lrs, memory plan, setup,
versions), ``claims.md``, ``bench.json`` (everything, per-step histories included), ``ppl_vs_memory.png`` and
``loss_curves.png`` (error bars: one sd over seeds), ``lr_sensitivity.png`` (``--tune``), and the terminal table.

Ranks: a method's rank is 1 + the number of methods whose mean perplexity is lower by more than the spread
``sqrt(sd_A^2 + sd_B^2)``; methods within the spread of each other share a rank (a tie), shown as ``=k``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import RankwiseError
from .claims import check_claims, claims_markdown

MB = 2**20

CSV_FIELDS = ["group", "label", "budget", "seed", "method", "options", "lr", "status", "eval_ppl", "eval_loss",
              "initial_eval_loss", "final_train_loss", "trainable_params", "total_params", "weights_mb", "grads_mb",
              "optimizer_state_mb", "train_mem_mb", "matched_mem_mb", "planned_mem_mb", "peak_mem_mb",
              "peak_mem_kind", "tokens", "tokens_per_s", "wall_s"]
SUMMARY_FIELDS = ["rank", "group", "label", "budget", "method", "n", "ppl_mean", "ppl_sd", "loss_mean", "loss_sd",
                  "optimizer_state_mb", "train_mem_mb", "peak_mem_mb", "trainable_params", "tokens_per_s", "rank_of",
                  "lr"]


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """One flat CSV record of a run (bytes as MiB, options as JSON)."""
    flat = {k: row.get(k) for k in CSV_FIELDS}
    for key in ("weights", "grads", "optimizer_state", "train_mem", "matched_mem", "planned_mem", "peak_mem"):
        if row.get(f"{key}_bytes") is not None:
            flat[f"{key}_mb"] = row[f"{key}_bytes"] / MB
    flat["options"] = json.dumps(row.get("options", {}), sort_keys=True)
    return flat


def loaded(row: dict[str, Any]) -> bool:
    """Whether something besides the bench kept the machine busy during the run: the 1-minute load average at its
    start or end, minus the bench's own threads (``bench_threads``: runs at a time x threads per run), above half
    the core count (its tokens/s was then measured on a busy machine)."""
    loads = [x for x in (row.get("load_avg_start"), row.get("load_avg_end")) if x is not None]
    own = row.get("bench_threads", 0)
    return bool(row.get("cpu_count")) and any(x - own > row["cpu_count"] / 2 for x in loads)


LOADED_NOTE = ("tok/s marked (loaded) was measured while other work kept the machine busy: its 1-minute load "
               "average, minus the bench's own threads, exceeded half its core count at a run's start or end, so it "
               "understates the method's speed; rerun on an idle machine.")


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per group (method @ budget), in first-seen order, with tie-aware ranks."""
    order: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        order.setdefault(r["group"], []).append(r)
    groups = []
    for name, runs in order.items():
        ok = [r for r in runs if r.get("status") == "ok" and math.isfinite(r.get("eval_loss", math.nan))]
        if not ok:
            continue
        ppl = [r["eval_ppl"] for r in ok]
        loss = [r["eval_loss"] for r in ok]
        first = ok[0]
        groups.append({
            "group": name, "label": first["label"], "budget": first.get("budget"), "method": first["method"],
            "options": first.get("options", {}), "lr": first.get("lr"), "n": len(ok), "failed": len(runs) - len(ok),
            "ppl_mean": statistics.fmean(ppl), "ppl_sd": _sd(ppl), "loss_mean": statistics.fmean(loss),
            "loss_sd": _sd(loss), "optimizer_state_mb": first["optimizer_state_bytes"] / MB,
            "train_mem_mb": first["train_mem_bytes"] / MB,
            "peak_mem_mb": statistics.fmean(r["peak_mem_bytes"] for r in ok) / MB
            if all(r.get("peak_mem_bytes") is not None for r in ok) else None,
            "peak_mem_kind": first.get("peak_mem_kind"), "trainable_params": first["trainable_params"],
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in ok), "loaded": any(map(loaded, ok)),
            "rank_value": first.get("options", {}).get("rank"), "seeds": [r["seed"] for r in ok],
            "history": [r["history"] for r in ok if r.get("history")],
        })
    for g in groups:
        better = sum(1 for h in groups if h is not g and
                     g["ppl_mean"] - h["ppl_mean"] > math.sqrt(g["ppl_sd"] ** 2 + h["ppl_sd"] ** 2))
        g["rank"] = 1 + better
    for g in groups:
        tied = sum(1 for h in groups if h["rank"] == g["rank"]) > 1
        g["rank_of"] = f"={g['rank']}" if tied else str(g["rank"])
    return groups


def _pm(mean: float, sd: float, n: int, fmt: str = ".1f") -> str:
    return f"{mean:{fmt}} ± {sd:{fmt}}" if n > 1 else f"{mean:{fmt}}"


# (header, cell) of the summary table
COLUMNS = [
    ("rank", lambda g: g["rank_of"]),
    ("method", lambda g: g["group"]),
    ("ppl ± sd", lambda g: _pm(g["ppl_mean"], g["ppl_sd"], g["n"])),
    ("seeds", lambda g: str(g["n"]) + (f" ({g['failed']} failed)" if g["failed"] else "")),
    ("r", lambda g: "-" if g["rank_value"] is None else str(g["rank_value"])),
    ("optim MiB", lambda g: f"{g['optimizer_state_mb']:.1f}"),
    ("w+g+o MiB", lambda g: f"{g['train_mem_mb']:.1f}"),
    ("peak MiB", lambda g: "-" if g["peak_mem_mb"] is None else f"{g['peak_mem_mb']:.0f}"),
    ("trainable", lambda g: f"{g['trainable_params'] / 1e6:.2f}M"),
    ("tok/s", lambda g: f"{g['tokens_per_s']:,.0f}" + (" (loaded)" if g.get("loaded") else "")),
    ("lr", lambda g: f"{g['lr']:.2e}"),
]


def table_rows(groups: list[dict[str, Any]], reference: dict[str, float] | None) -> list[list[str]]:
    rows = [[h(g) for _, h in COLUMNS] for g in sorted(groups, key=lambda g: g["ppl_mean"])]
    for name in ("bigram", "unigram"):
        if reference and name in reference:
            rows.append(["ref", name, f"{reference[name]:.1f}"] + ["-"] * (len(COLUMNS) - 3))
    return rows


def markdown_table(groups: list[dict[str, Any]], reference: dict[str, float] | None = None) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(groups, reference)]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    info = {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": str(torch.get_num_threads()),  # of this process; each run's: setup.threads_per_run
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


def _csv(fields: list[str], records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def write_results(out: Path, rows: list[dict[str, Any]], bp, cfg, reference: dict[str, float] | None = None,
                  lr_info: dict[str, dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Every output file; returns the groups and the claims markdown."""
    from dataclasses import asdict

    preset = bp.preset
    groups = aggregate(rows)
    claims = check_claims(groups)
    claims_md = claims_markdown(claims)
    untuned = [label for label, info in (lr_info or {}).items() if not info["tuned"]]
    if untuned:
        claims_md += (f"\n\nThe lrs of {', '.join(untuned)} were not tuned (see Learning rates): their rows compare "
                      "those lrs, not tuned methods; `rankwise bench --tune` tunes them.")
    write_text_atomic(out / "results.csv", _csv(CSV_FIELDS, [summary(r) for r in rows]))
    write_text_atomic(out / "summary.csv", _csv(SUMMARY_FIELDS, groups))
    write_text_atomic(out / "claims.md", f"# Claims checked — preset `{cfg.preset}`\n\n{claims_md}\n\n"
                                         f"{_CLAIMS_NOTE}\n")
    env = versions()
    setup = {"preset": cfg.preset, **{k: v for k, v in asdict(preset).items() if k != "methods"},
             "seeds": bp.seeds, "match_memory": bp.budgets, "overrides": cfg.overrides,
             "threads_per_run": cfg.threads if cfg.isolate else env["torch_threads"]}
    ok = [r for r in rows if r.get("status") == "ok"]
    tokens = sorted({r["tokens"] for r in ok})
    lr_lines = ["| method | lr | from | tuned | fixed at the paper's value |", "|---|---|---|---|---|"]
    for label, info in (lr_info or {}).items():
        fixed = ", ".join(f"{k}={v}" for k, v in info["fixed"].items()) or "-"
        lr_lines.append(f"| {label} | {info['lr']:.3g} | {info['source']} | {', '.join(info['tuned']) or '-'} | "
                        f"{fixed} |")
    skipped = [f"- {s['label']} @ {s['budget']}: {s['reason']}" for s in bp.skipped]
    failed = [f"- {r['group']} seed {r['seed']}: {r['status']}" for r in rows if r.get("status") != "ok"]
    plan_lines = []
    if bp.budgets:
        plan_lines = [f"Each method's rank was chosen by the planner so that weights + gradients + optimizer state "
                      f"land within {cfg.memory_tolerance:.0%} of each budget (full-rank AdamW: "
                      f"{bp.full_mem / MB:.1f} MiB; `80%` means 80% of that).", "",
                      "| budget | method | rank | planned MiB | / budget |", "|---|---|---|---|---|"]
        for (label, b), m in bp.matches.items():
            if m.ok:
                plan_lines.append(f"| {b} | {label} | {m.rank if m.rank is not None else '-'} | "
                                  f"{m.bytes / MB:.2f} | {m.bytes / m.target:.3f} |")
        plan_lines.append("")
    md = [f"# rankwise bench — preset `{cfg.preset}`", "", preset.description, "",
          markdown_table(groups, reference), "",
          *([LOADED_NOTE, ""] if any(g["loaded"] for g in groups) else []),
          f"Mean ± sd over {len(bp.seeds)} seed(s) (model init and data order both follow the seed). Rank: 1 + the "
          "number of methods clearly better (mean lower by more than the spread sqrt(sd_A² + sd_B²)); `=k` marks a "
          "tie. Reference rows: the perplexity of the training split's unigram (add-one) and bigram (Witten-Bell) "
          f"statistics on the same {reference['eval_tokens'] if reference else '-'} validation tokens.", "",
          "Memory columns (MiB): *optim* is the exact size of every tensor in the optimizer's state after the "
          "last step (if that step just dropped some state, as lowrank-rr's momentum reset does, the shape-based "
          "size of the full state); *w+g+optim* adds all parameters and buffers (fp32 master weights, frozen ones "
          "included) and one gradient per trainable parameter (activations excluded); *peak* is the measured "
          f"{ok[0]['peak_mem_kind'] if ok else 'peak'} of the training loop (on CPU, the resident-set growth: "
          "approximate).", "",
          "## Claims", "", claims_md, "", _CLAIMS_NOTE, "",
          "## Learning rates", "", *lr_lines, "",
          *(["## Memory plan", "", *plan_lines] if plan_lines else []),
          *(["## Skipped", "", *skipped, ""] if skipped else []),
          *(["## Failed runs (rerun the same command to redo them)", "", *failed, ""] if failed else []),
          f"Every run saw {', '.join(f'{t:,}' for t in tokens) or '-'} training tokens; batch i is a pure function "
          "of the seed and i, so runs of one seed see the same tokens in the same order.", "",
          "## Setup", "", "```json", json.dumps(setup, indent=1, default=str), "```", "",
          "## Methods", "", "| method | registered method | options |", "|---|---|---|",
          *[f"| {g['group']} | {g['method']} | `{json.dumps(g['options'], sort_keys=True)}` |" for g in groups], "",
          "## Versions", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    write_text_atomic(out / "results.md", "\n".join(md))
    write_text_atomic(out / "bench.json", json.dumps(
        {"setup": setup, "versions": env, "reference": reference, "lrs": lr_info, "skipped": bp.skipped,
         "groups": [{k: v for k, v in g.items() if k != "history"} for g in groups], "claims": claims, "runs": rows},
        indent=1, default=str))
    plot_ppl_vs_memory(groups, out / "ppl_vs_memory.png", reference, setup)
    plot_loss_curves(groups, out / "loss_curves.png", setup)
    return groups, claims_md


_CLAIMS_NOTE = ("d = (1 + margin) ppl_B − ppl_A (positive: A better); spread = sqrt(sd_A² + sd_B²) over seeds; "
                "held if d > spread, did not hold if d < −spread, else a tie. \"Equal memory\" compares methods at "
                "the same --match-memory budget; \"less memory\" takes the pair whose memory ratio is closest to "
                "the claim's.")


def _save(fig, path: Path, tight: bool = True) -> None:
    from ..plots import save_figure

    save_figure(fig, path, tight=tight)


# tab10 without its grey (the reference lines are grey), crossed with line styles: (colour, style) pairs stay
# distinct for 36 methods (9 and 4 are coprime), and methods 10+ differ from 1-9 by line style, not colour alone.
_PALETTE = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]


def method_styles(labels: list[str]) -> dict[str, dict[str, str]]:
    """One (colour, line style, marker) per method label, in order; the same method keeps its style across plots.
    Methods 10+ reuse a colour, never with the same marker (plots that fix the line style still tell them apart)."""
    return {label: {"color": _PALETTE[i % len(_PALETTE)], "ls": _LINESTYLES[i % len(_LINESTYLES)],
                    "marker": _MARKERS[(i + i // len(_PALETTE)) % len(_MARKERS)]} for i, label in enumerate(labels)}


def bench_title(groups: list[dict[str, Any]], setup: dict[str, Any] | None) -> str:
    """``preset · model · steps x tokens/step · rank · seeds`` (and activation checkpointing when the setup has it)."""
    setup = setup or {}
    parts = []
    if setup.get("preset"):
        parts.append(f"preset {setup['preset']}")
    if setup.get("model"):
        parts.append(f"model {setup['model']}")
    if setup.get("steps") and setup.get("batch_size") and setup.get("seq_len"):
        per_step = setup["batch_size"] * setup["seq_len"] * setup.get("grad_accum", 1)
        parts.append(f"{setup['steps']} steps x {per_step:,} tokens")
    ranks = sorted({g["rank_value"] for g in groups if g.get("rank_value") is not None})
    if ranks:
        parts.append(f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks)))
    seeds = setup.get("seeds") or sorted({s for g in groups for s in g.get("seeds", [])})
    if isinstance(seeds, int):
        parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    elif seeds:
        parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})")
    if any(setup.get(k) for k in ("checkpointing", "gradient_checkpointing", "activation_checkpointing")):
        parts.append("activation checkpointing")
    return " · ".join(parts)


def _label_points(ax, points: list[tuple[float, float, str, str]]) -> list:
    """Annotate each (x, y, text, colour) beside its point, trying offsets until the label's box overlaps no label
    placed before it (greedy, in display coordinates: call after the figure's final layout)."""
    renderer = ax.figure.canvas.get_renderer()
    offsets = [(dx, dy) for dy in (3, -11, 13, -21, 23, -31, 33, -41) for dx in (7, -7)]
    placed, texts = [], []
    for x, y, text, color in sorted(points, key=lambda p: p[1]):
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=color,
                            ha="left" if dx > 0 else "right", va="bottom")
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        else:
            t = ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=7, color=color)
            box = t.get_window_extent(renderer)
        placed.append(box)
        texts.append(t)
    return texts


def ppl_vs_memory_figure(groups: list[dict[str, Any]], reference: dict[str, float] | None = None,
                         setup: dict[str, Any] | None = None):
    """The figure of :func:`plot_ppl_vs_memory`, laid out, not yet saved."""
    from ..plots import plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        by_label.setdefault(g["label"], []).append(g)
    styles = method_styles(list(by_label))
    ends = []
    for i, (label, gs) in enumerate(by_label.items()):
        gs = sorted(gs, key=lambda g: g["train_mem_mb"])
        dodge = 1 + 0.006 * (i - (len(by_label) - 1) / 2)  # methods at equal memory side by side, not on top
        st = styles[label]
        xs = [g["train_mem_mb"] * dodge for g in gs]
        ax.errorbar(xs, [g["ppl_mean"] for g in gs], yerr=[g["ppl_sd"] for g in gs], fmt=st["marker"], ls=st["ls"],
                    color=st["color"], ms=5, capsize=3, lw=1)
        ends.append((xs[-1], gs[-1]["ppl_mean"], label, st["color"]))
    for name, style in (("unigram", ":"), ("bigram", "--")):
        if reference and name in reference:
            ax.axhline(reference[name], color="gray", ls=style, lw=1, label=f"{name} statistics")
    ax.set_xlabel("weights + gradients + optimizer state (MiB)")
    ax.set_ylabel("validation perplexity (mean ± sd over seeds)")
    ax.set_yscale("log")
    ax.margins(x=0.12)
    caption = bench_title(groups, setup)
    ax.set_title("perplexity vs training memory (lower-left is better)" + (f"\n{caption}" if caption else ""),
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if reference:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _label_points(ax, ends)
    return fig


def plot_ppl_vs_memory(groups: list[dict[str, Any]], path: Path, reference: dict[str, float] | None = None,
                       setup: dict[str, Any] | None = None) -> None:
    """Eval perplexity (mean ± sd over seeds) against weights + gradients + optimizer state; one line per method
    through its budgets (methods at one budget drawn 0.6% apart), named beside its last point (labels placed so
    that none overlaps another); the n-gram reference levels as horizontal lines; the setup in the title."""
    _save(ppl_vs_memory_figure(groups, reference, setup), path, tight=False)


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def loss_curves_figure(groups: list[dict[str, Any]], setup: dict[str, Any] | None = None):
    """The figure of :func:`plot_loss_curves`, not yet saved."""
    from ..plots import plt

    budgets = list(dict.fromkeys(g["budget"] for g in groups)) or [None]
    styles = method_styles(list(dict.fromkeys(g["label"] for g in groups)))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.8), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        for g in (g for g in groups if g["budget"] == budget and g["history"]):
            runs = g["history"]
            steps = [h["step"] for h in runs[0]]
            curves = [_smooth([h["loss"] for h in run]) for run in runs if len(run) == len(steps)]
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
            sd = [_sd([c[i] for c in curves]) for i in range(len(steps))]
            color = styles[g["label"]]["color"]
            ax.plot(steps, mean, lw=1.2, color=color, ls=styles[g["label"]]["ls"], label=g["label"])
            ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                            color=color, alpha=0.2, lw=0)
            evals: dict[int, list[float]] = {}
            for run in runs:
                for h in run:
                    if "eval_loss" in h:
                        evals.setdefault(h["step"], []).append(h["eval_loss"])
            if evals:
                xs = sorted(evals)
                ax.errorbar(xs, [statistics.fmean(evals[x]) for x in xs], yerr=[_sd(evals[x]) for x in xs],
                            fmt=styles[g["label"]]["marker"], color=color, ms=3, capsize=2)
        ax.set_title("" if budget is None else f"memory budget {budget}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (nats/token): train EMA ± sd, markers: validation ± sd")
    caption = bench_title(groups, setup)
    fig.suptitle("training and validation loss" + (f"\n{caption}" if caption else ""), fontsize=9)
    return fig


def plot_loss_curves(groups: list[dict[str, Any]], path: Path, setup: dict[str, Any] | None = None) -> None:
    """Training loss (EMA; mean over seeds, band ± sd) and validation loss (mean ± sd) per method; one panel per
    --match-memory budget, one (colour, line style) per method across panels; the setup in the title."""
    _save(loss_curves_figure(groups, setup), path)


def _space(method: str) -> str:
    """``gradient space`` (an optimizer; full-rank AdamW is its anchor) or ``weight space`` (a parameterization)."""
    from .. import methods

    try:
        family = methods.info(method).family
    except RankwiseError:
        return "weight space"
    return "gradient space" if family in ("full", "optim") else "weight space"


def plot_lr_sensitivity(tuned: dict[str, Any], path: Path) -> None:
    """Final validation loss vs lr, one curve per method, gradient-space methods (with full-rank AdamW) and
    weight-space ones in two panels on one y-axis: the full-horizon trials solid, the first rung dashed and faint;
    error bars: sd over the tuning seeds; the chosen lr starred."""
    from ..plots import plt

    horizons = tuned["successive_halving"]["horizons"]
    panels: dict[str, list[str]] = {}
    for name, m in tuned["methods"].items():
        panels.setdefault(_space(m["method"]), []).append(name)
    order = [p for p in ("gradient space", "weight space") if p in panels]
    fig, axes = plt.subplots(1, len(order), figsize=(6.2 * len(order), 4.8), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], order):
        styles = method_styles(panels[panel])
        for name in panels[panel]:
            m, st = tuned["methods"][name], styles[name]
            for steps, ls in ((horizons[0], "--"), (horizons[-1], "-")):
                trials = sorted((t for t in m["sweep"] if t["steps"] == steps and math.isfinite(t["mean"])),
                                key=lambda t: t["lr"])
                if trials:
                    ax.errorbar([t["lr"] for t in trials], [t["mean"] for t in trials],
                                yerr=[t["sd"] for t in trials], marker=st["marker"], ls=ls, ms=4, capsize=2, lw=1,
                                color=st["color"], label=name if ls == "-" else None, alpha=1 if ls == "-" else 0.35)
            best = [t for t in m["sweep"] if t["steps"] == horizons[-1] and t["lr"] == m["lr"]]
            if best:
                ax.plot([m["lr"]], [best[0]["mean"]], "*", color=st["color"], ms=13, mec="black", mew=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    axes[0][0].set_ylabel("final validation loss")
    fig.suptitle(f"lr sensitivity, preset {tuned.get('preset', '?')} (solid: {horizons[-1]} steps, dashed: first "
                 f"rung, {horizons[0]} steps; star: tuned lr)", fontsize=10)
    _save(fig, path)


def print_table(groups: list[dict[str, Any]], title: str, reference: dict[str, float] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, (header, _) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if i in (0, 1) else "right")
    for row in table_rows(groups, reference):
        table.add_row(*row)
    Console().print(table)
