"""Tables (rich), JSON and PNG figures (matplotlib, Agg) of the analyses; every file written atomically."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..atomic import write_json_atomic  # noqa: E402
from ..plots import save_figure  # noqa: E402

HEATMAP_COLUMNS = ("weight_effective_rank", "weight_energy90_rank", "weight_energy99_rank", "weight_stable_rank",
                   "grad_effective_rank", "grad_energy90_rank", "grad_energy99_rank", "grad_stable_rank",
                   "drift_overlap")


def write_json(obj: Any, path: str | Path) -> None:
    write_json_atomic(path, obj)


def _save(fig, path: str | Path, tight: bool = True) -> None:
    save_figure(fig, path, tight=tight)


def heatmap(rows: list[dict], path: str | Path) -> None:
    """Layers x metrics; every rank metric divided by the matrix's full rank (so 1 = full rank), overlap as is."""
    cols = [c for c in HEATMAP_COLUMNS if any(c in r for r in rows)]
    data = torch.tensor([[r.get(c, float("nan")) / (1.0 if c == "drift_overlap" else r["full_rank"]) for c in cols]
                         for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.28 * len(rows) + 1.8))
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(cols)), [c.replace("_", "\n", 1) for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [short_name(r["name"]) for r in rows], fontsize=6)
    for (i, j), v in zip(((i, j) for i in range(data.shape[0]) for j in range(data.shape[1])), data.flatten()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="rank / full rank (drift: overlap)")
    ax.set_title("low-rank structure per layer")
    fig.tight_layout()
    _save(fig, path)


DASHES = [(0, ()), (0, (5, 2)), (0, (1, 1.5)), (0, (4, 1.5, 1, 1.5)), (0, (8, 2, 2, 2)), (0, (2, 3)),
          (0, (6, 1, 1, 1, 1, 1)), (0, (3, 3)), (0, (10, 3))]


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "q_proj")``; no layer index -> ``(None, name)``."""
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else None), name.rsplit(".", 1)[-1]


def spectra_plot(weight: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], path: str | Path) -> None:
    """Normalised singular values s_i / s_1 (log scale) vs normalised index i / k, one line per matrix: colour =
    layer (colorbar), line style = matrix kind (legend: q_proj, ..., down_proj)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, Normalize
    from matplotlib.lines import Line2D

    panels = [("weights", weight)] + ([("gradients", grad)] if grad else [])
    names = list(dict.fromkeys(n for _, sp in panels for n in sp))
    parsed = {n: _layer_and_kind(n) for n in names}
    by_layer = all(layer is not None for layer, _ in parsed.values())
    if by_layer:
        position = {n: float(layer) for n, (layer, _) in parsed.items()}
        kinds = list(dict.fromkeys(kind for _, kind in parsed.values()))
    else:  # no layer index in the names: colour by order, one legend entry per matrix
        position = {n: float(i) for i, n in enumerate(names)}
        kinds = []
    style = {k: DASHES[i % len(DASHES)] for i, k in enumerate(kinds)}
    top = int(max(position.values(), default=0.0))
    cmap = plt.get_cmap("viridis", top + 1) if by_layer else plt.get_cmap("viridis")
    norm = (BoundaryNorm([i - 0.5 for i in range(top + 2)], top + 1) if by_layer  # one colour per layer
            else Normalize(0.0, max(top, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1.5, 4.2), squeeze=False,
                             layout="constrained")
    for ax, (title, spectra) in zip(axes[0], panels):
        for name, s in spectra.items():
            s = s.float()
            x = torch.arange(1, s.numel() + 1) / s.numel()
            ax.semilogy(x.numpy(), (s / s[0].clamp_min(1e-30)).clamp_min(1e-12).numpy(), lw=0.9,
                        color=cmap(norm(position[name])), linestyle=style.get(parsed[name][1], "-"),
                        label=None if by_layer else short_name(name))
        ax.set_xlabel("i / rank (normalised singular value index)")
        ax.set_ylabel("s_i / s_1")
        ax.set_title(f"singular values of {title} ({len(spectra)} matrices)")
        ax.grid(alpha=0.3)
    if by_layer:
        handles = [Line2D([], [], color="0.25", lw=1.2, linestyle=style[k], label=k) for k in kinds]
        axes[0][0].legend(handles=handles, title="matrix", fontsize=7, title_fontsize=7, loc="lower left")
        fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes[0]), label="layer",
                     ticks=range(0, top + 1, max(1, (top + 1) // 12)))
    else:
        axes[0][0].legend(fontsize=6, loc="lower left", ncol=1 + len(names) // 12)
    _save(fig, path, tight=False)  # constrained layout places the colorbar


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: str | Path, xlabel: str, ylabel: str,
              title: str, logx: bool = False, logy: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.attn.q_proj`` (table rows)."""
    return name.replace("model.layers.", "").replace("self_attn", "attn")


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str) -> None:
    """A rich table of ``rows`` with (key, header) ``columns``; the first column is a module name."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, (_, header) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        cells = [_fmt(r.get(k, "")) for k, _ in columns]
        table.add_row(short_name(cells[0]), *cells[1:])
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)
