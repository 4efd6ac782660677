"""The adapter methods in the registry and CLI: ``rankwise methods``, option names, ``rankwise merge``."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import logits, perturb, small_model, tokens

from rankwise import adapters, methods
from rankwise.cli.main import main
from rankwise.errors import RankwiseError

ADAPTER_METHODS = {"lora", "rslora", "dora", "pissa", "lora-ga", "lora-xs", "lora-sb", "nola", "vera", "randlora",
                   "lora-pro", "lora-pro-lite", "altlora"}


def test_methods_lists_every_variant(capsys):
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert ADAPTER_METHODS <= set(listed)
    for name in ADAPTER_METHODS:
        assert listed[name]["family"] == "adapters"
        assert {"r", "rank", "alpha", "target", "dropout"} <= set(listed[name]["options"])


def test_rank_alias_and_conflict():
    model = methods.get("lora", rank=4, target="q_proj").prepare(small_model())
    assert {a.r for a in adapters.active_parameterizations(model).values()} == {4}
    with pytest.raises(RankwiseError, match="got both r=4 and rank=8"):
        methods.get("lora", r=4, rank=8)
    with pytest.raises(RankwiseError, match="needs calibration batches"):
        methods.get("lora-ga", r=4).prepare(small_model())


def test_lora_pro_methods_build_their_optimizers():
    method = methods.get("lora-pro", r=4, bias_step_offset=1)
    model = method.prepare(small_model())
    opt = method.build_optimizer(model, methods.OptimConfig(lr=1e-3))
    assert isinstance(opt, adapters.LoRAPro) and opt.bias_step_offset == 1 and len(opt.loras) == 4
    method = methods.get("lora-pro-lite", r=4)
    opt = method.build_optimizer(method.prepare(small_model()), methods.OptimConfig(lr=1e-3))
    assert isinstance(opt, adapters.LoRAProLite)
    assert [len(g) for g in opt.shape_groups] == [4]  # q_proj, v_proj of both layers: one batched solve
    method = methods.get("altlora", r=4, alternate_every=5)
    opt = method.build_optimizer(method.prepare(small_model()), methods.OptimConfig(lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(opt, adapters.AltLoRA) and opt.alternate_every == 5
    assert opt.param_groups[0]["beta"] == 0.8


def test_merge_command_writes_a_plain_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    small_model().save_pretrained(base_dir)
    model, x = small_model(), tokens()
    adapters.apply(model, "nola", r=4, target="all-linear")
    perturb(model, std=0.05)
    adapters.save_adapter(model, adapter_dir, base_model_name_or_path=str(base_dir))
    assert main(["merge", str(adapter_dir), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(merged, x), logits(model, x), atol=1e-5)
    assert main(["merge", str(adapter_dir), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "m2")]) == 2
    assert "does not name its base model" in capsys.readouterr().err
