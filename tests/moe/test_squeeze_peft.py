"""LoRA-Squeeze's per-layer ranks in PEFT's format: an annealed LoRA (zero rank pairs) is written at its kept rank,
an energy-squeezed LoRA with its own rank per layer as ``rank_pattern`` / ``alpha_pattern``; PEFT loads both with the
same logits, and so does rankwise."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rankwise import adapters
from rankwise.adapters.moe.squeeze import anneal_rank, squeeze_lora
from rankwise.models import build_model

peft = pytest.importorskip("peft")
TARGET = ["q_proj", "v_proj", "up_proj", "down_proj"]


def model_with_lora(rslora: bool = False):
    base = build_model("tiny", vocab_size=256, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4).eval()
    model = adapters.apply(copy.deepcopy(base), "lora", r=8, alpha=16.0, target=TARGET, rslora=rslora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(adapters.active_parameterizations(model).values()):
            decay = (0.2 + 0.3 * (i % 3)) ** torch.arange(8, dtype=torch.float32)  # spectra decaying per layer
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * decay * 0.1)
    return base, model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def check_both_ways(base, model, path):
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = logits(model, x)
    adapters.save_adapter(model, path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert (logits(loaded, x) - expected).abs().max() <= 1e-5
    ours = adapters.load_adapter(copy.deepcopy(base), path)
    assert (logits(ours, x) - expected).abs().max() <= 1e-5
    assert (expected - logits(base, x)).abs().max() > 1e-3
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("rslora", [False, True])
def test_annealed_lora_is_written_at_its_kept_ranks(tmp_path, rslora):
    base, model = model_with_lora(rslora)
    layers = adapters.active_parameterizations(model)
    for i, layer in enumerate(layers.values()):
        anneal_rank(layer, 3 if i % 2 else 5)
    config = check_both_ways(base, model, tmp_path / "a")
    names = [k.rsplit(".", 1)[0] for k in layers]
    assert {config["r"], *config["rank_pattern"].values()} == {3, 5}
    ranks = {n: config["rank_pattern"].get(n, config["r"]) for n in names}
    assert [ranks[n] for n in names] == [3 if i % 2 else 5 for i in range(len(names))]
    from safetensors.torch import load_file

    shapes = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(shapes[f"base_model.model.{n}.lora_A.weight"].shape[0] == ranks[n] for n in names)


def test_energy_squeeze_picks_a_rank_per_layer_saved_as_rank_pattern(tmp_path):
    base, model = model_with_lora()
    expected = {}
    for k, layer in adapters.active_parameterizations(model).items():  # oracle: the dense update's spectrum
        s2 = torch.linalg.svdvals((layer.lora_B @ layer.lora_A).detach().double()).square()
        expected[k] = int(((s2.cumsum(0) / s2.sum()) < 0.95).sum()) + 1
    squeeze_lora(model, 8, energy=0.95)
    ranks = {k: layer.r for k, layer in adapters.active_parameterizations(model).items()}
    assert ranks == expected and len(set(ranks.values())) > 1
    config = check_both_ways(base, model, tmp_path / "e")
    assert config["rank_pattern"] and config["alpha_pattern"] == {}
