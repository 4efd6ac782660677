"""PEFT-format save/load: interop with peft in both directions, own-format round trips, bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from adapter_helpers import KINDS, logits, perturb, small_model, tokens

from rankwise import adapters
from rankwise.errors import RankwiseError

TARGET = ["q_proj", "v_proj", "up_proj"]


def peft_logits(path, x) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(small_model(), str(path)).eval(), x)


@pytest.mark.parametrize("variant", ["lora", "rslora", "pissa"])
def test_rankwise_adapter_loads_in_peft_with_same_logits(tmp_path, variant):
    model, x = small_model(), tokens()
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, rslora=variant == "rslora")
    if variant == "pissa":  # residual base: saved as a rank-2r LoRA relative to the original weights
        adapters.init_pissa(model)
    perturb(model, std=0.02)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == (8 if variant == "pissa" else 4)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    ours = logits(model, x)
    assert not torch.allclose(ours, logits(small_model(), x), atol=1e-3)
    assert torch.allclose(peft_logits(tmp_path, x), ours, atol=1e-5)
    loaded = adapters.load_adapter(small_model(), tmp_path)
    assert torch.allclose(logits(loaded, x), ours, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_loads_in_rankwise_with_same_logits(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    x = tokens()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(small_model(), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    expected = logits(peft_model, x)
    assert not torch.allclose(expected, logits(small_model(), x), atol=1e-3)
    model = adapters.load_adapter(small_model(), tmp_path)
    assert torch.allclose(logits(model, x), expected, atol=1e-5)
    assert len(adapters.adapter_layers(model)) == 4


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("lora", "vera", "randlora")] + ["lora-sb"])
def test_own_methods_round_trip(tmp_path, kind):
    """Methods PEFT lacks (VeRA and RandLoRA are PEFT's format now: tests/reference/test_ref_peft_*.py)."""
    model, x = small_model(), tokens()
    if kind == "lora-sb":
        adapters.init_lora_sb(model, [tokens(4, 33)], r=4, target=TARGET, eta=0.5)
    else:
        adapters.apply(model, kind, r=4, target=TARGET, seed=3)
    perturb(model, std=0.02)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RANKWISE"
    loaded = adapters.load_adapter(small_model(), tmp_path, adapter_name="x")
    assert torch.allclose(logits(loaded, x), logits(model, x), atol=1e-6)
    stored = sum(t.numel() for t in _tensors(tmp_path).values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_data_factors = 0 if kind not in ("lora-xs", "lora-sb") else sum(
        a.core_A.numel() + a.core_B.numel() for a in adapters.active_parameterizations(model).values())
    assert stored == trainable + frozen_data_factors  # random bases are not stored


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _saved(tmp_path):
    model = small_model()
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET)
    perturb(model)
    return adapters.save_adapter(model, tmp_path / "adapter")


def _edit_tensors(path, edit):
    from safetensors.torch import save_file

    tensors = _tensors(path)
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _edit_config(path, edit):
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _first_key(t):
    return sorted(t)[0]


BAD_FILES = {
    "corrupt": (lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:100]), "corrupt or not a safetensors file"),
    "shape": (lambda p: _edit_tensors(p, lambda t: t.update({_first_key(t): torch.zeros(5, 64)})),
              r"has shape \[5, 64\] but this model needs \[4, 64\]"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(_first_key(t))), "missing tensors"),
    "missing module": (lambda p: _edit_tensors(p, lambda t: [t.pop(k) for k in list(t) if "layers.1.mlp" in k]),
                       "no tensors for 1 target module"),
    "foreign module": (lambda p: _edit_tensors(p, lambda t: t.update(
        {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})),
                       "belongs to no linear layer"),
    "wrong method": (lambda p: _edit_config(p, lambda c: c.update(peft_type="IA3")), "peft_type 'IA3' is not supported"),
    "unknown own method": (lambda p: _edit_config(p, lambda c: c.update(
        peft_type="RANKWISE", rankwise_method="dora", rankwise_options={"r": 4})), "unknown adapter method 'dora'"),
    "old own-format vera": (lambda p: _edit_config(p, lambda c: c.update(
        peft_type="RANKWISE", rankwise_method="vera", rankwise_options={"r": 4})), "by an older rankwise"),
    "dora without magnitude": (lambda p: _edit_config(p, lambda c: c.update(use_dora=True)),
                               r"missing tensors \['lora_magnitude_vector'\]"),
    "unsupported key": (lambda p: _edit_config(p, lambda c: c.update(trainable_token_indices=[1])),
                        r"trainable_token_indices=\[1\], which rankwise does not support"),
    "bad json": (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
    "no config": (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_and_leaves_model_untouched(tmp_path, case):
    path = _saved(tmp_path)
    damage, message = BAD_FILES[case]
    damage(path)
    model = small_model()
    adapters.apply(model, "vera", r=2, target=["k_proj"], adapter_name="existing")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repr_before = repr(model)
    with pytest.raises(RankwiseError, match=message):
        adapters.load_adapter(model, path)
    assert repr(model) == repr_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_save_errors(tmp_path):
    model = small_model()
    with pytest.raises(RankwiseError, match="no adapter named 'default'"):
        adapters.save_adapter(model, tmp_path)
    adapters.apply(model, "lora", target=TARGET)
    adapters.merge(model)
    with pytest.raises(RankwiseError, match="unmerge before saving"):
        adapters.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())
