"""Benchmark figures: the setup in the title, one distinct style per method, point labels that never overlap."""

from __future__ import annotations

from rankwise.bench.report import loss_curves_figure, method_styles, ppl_vs_memory_figure
from rankwise.plots import plt

SETUP = {"preset": "tiny", "model": "mini", "steps": 250, "batch_size": 16, "seq_len": 128, "seeds": [0, 1, 2],
         "checkpointing": True}


def _group(label: str, mem: float, ppl: float, rank: int | None = 32) -> dict:
    history = [[{"step": s, "loss": 5.0 - s / 100, **({"eval_loss": 4.9} if s == 10 else {})} for s in range(1, 11)]]
    return {"group": label, "label": label, "budget": None, "train_mem_mb": mem, "ppl_mean": ppl, "ppl_sd": 1.0,
            "rank_value": rank, "seeds": [0, 1, 2], "history": history}


# galore and fira as in the tiny bench: nearly the same memory and close perplexities
GROUPS = [_group("full", 19.66, 145.0, None), _group("galore", 15.75, 66.0), _group("fira", 15.76, 68.0),
          _group("frugal", 15.73, 147.0), _group("lowrank", 12.8, 190.0), _group("lowrank-rr", 12.9, 170.0),
          _group("relora", 16.0, 240.0), _group("sltrain", 13.5, 140.0), _group("extra", 15.74, 67.0)]


def test_ppl_vs_memory_names_every_method_once_without_overlap_and_titles_the_setup():
    fig = ppl_vs_memory_figure(GROUPS, {"unigram": 600.0, "bigram": 75.0}, SETUP)
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in texts) == sorted(g["label"] for g in GROUPS)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    title = ax.get_title()
    assert all(s in title for s in ("preset tiny", "model mini", "250 steps x 2,048 tokens", "rank 32",
                                    "3 seeds", "activation checkpointing"))
    plt.close(fig)


def test_loss_curves_title_and_legend_name_the_setup_and_each_method_with_a_distinct_style():
    fig = loss_curves_figure(GROUPS, SETUP)
    assert "rank 32" in fig._suptitle.get_text() and "preset tiny" in fig._suptitle.get_text()
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [g["label"] for g in GROUPS]
    plt.close(fig)
    styles = method_styles([f"m{i}" for i in range(36)])
    pairs = {(s["color"], s["ls"]) for s in styles.values()}
    assert len(pairs) == 36 and all(s["color"] != "C7" for s in styles.values())  # C7: the reference lines' grey
