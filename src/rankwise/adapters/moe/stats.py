"""Routing statistics: per-layer expert (rank) usage of routed adapters, as arrays and as a PNG heat map."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .layers import routed_layers


def routing_usage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> fraction of selections each expert received since the last ``reset_usage`` (E,)."""
    return {name: (layer.usage / layer.usage.sum().clamp_min(1)).float().cpu()
            for name, layer in routed_layers(model).items()}


def reset_usage(model: nn.Module) -> None:
    for layer in routed_layers(model).values():
        layer.usage.zero_()


def plot_routing(usage: dict[str, torch.Tensor], png: str | Path, title: str = "") -> None:
    """Heat map: one row per routed layer, one column per expert, colour = share of that layer's selections."""
    import matplotlib

    matplotlib.use("Agg")
    from ...plots import plt, save_figure

    names = list(usage)
    width = max(len(u) for u in usage.values())
    grid = torch.full((len(names), width), float("nan"))
    for i, name in enumerate(names):
        grid[i, :len(usage[name])] = usage[name] * len(usage[name])  # 1 = uniform share
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(min(14, 4 + width * 0.15), max(2.8, 1.2 + 0.3 * len(names))))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), [n.removeprefix("model.").replace(".adapters.default", "") for n in names],
                  fontsize=6)
    ax.set_xlabel("expert (rank) index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or "routing: share of selections x number of experts (1 = uniform)")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share / uniform share")
    save_figure(fig, png, dpi=110)
