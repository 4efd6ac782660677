"""The figures carry their keys: spectra.png a legend of matrix kinds and a layer colorbar, routing a labelled
colorbar."""

import torch

import rankwise.analysis.report as report
import rankwise.plots as plots


def capture(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path, **kw: figs.append(fig))
    return figs


def test_spectra_plot_has_a_kind_legend_and_a_layer_colorbar(monkeypatch):
    figs = capture(monkeypatch, report)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spectra = {f"model.layers.{i}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}": torch.rand(16).sort(
        descending=True).values for i in range(4) for k in kinds}
    report.spectra_plot(spectra, spectra, "unused.png")
    fig = figs[0]
    panels, bars = fig.axes[:2], fig.axes[2:]
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == kinds
    assert len(bars) == 1 and bars[0].get_ylabel() == "layer"
    assert [int(t) for t in bars[0].get_yticks()] == [0, 1, 2, 3]


def test_routing_colorbar_is_labelled(monkeypatch):
    from rankwise.adapters.moe.stats import plot_routing

    figs = capture(monkeypatch, plots)
    plot_routing({"model.layers.0.mlp.up_proj.adapters.default": torch.full((8,), 1 / 8)}, "unused.png")
    assert figs[0].axes[1].get_ylabel() == "share / uniform share"
