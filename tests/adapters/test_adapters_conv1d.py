"""Adapters on GPT-2's ``Conv1D`` (``y = x W + b``, ``W`` stored ``(in, out)``, PEFT's ``fan_in_fan_out=True``) and
on a plain MLP.

Oracle: the same GPT-2 with every ``Conv1D`` turned into the equivalent ``nn.Linear`` (weight transposed), where the
adapters are the PEFT-checked ones; both must agree tensor for tensor, through merge / unmerge, and PEFT must load
and write GPT-2 adapter files with the same logits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from adapter_helpers import logits, perturb

from rankwise import adapters
from rankwise.adapters.base import is_conv1d
from rankwise.cli.main import main
from rankwise.methods import get

VOCAB = 64
ROUTED = ("smora", "mixlora", "flylora")
CONV = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
VARIANTS = {"lora": dict(method="lora"), "rslora": dict(method="lora", rslora=True),
            "dora": dict(method="lora", dora=True), "pissa": dict(method="lora", init="pissa"),
            "olora": dict(method="lora", init="olora"), "lora-xs": dict(method="lora-xs"),
            "nola": dict(method="nola"), "vera": dict(method="vera"), "randlora": dict(method="randlora"),
            "smora": dict(method="smora", top_k=2), "mixlora": dict(method="mixlora", num_experts=4), "flylora": dict(method="flylora", top_k=2)}


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def as_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each ``Conv1D`` replaced by the ``nn.Linear`` computing the same function."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if is_conv1d(m):
            lin = nn.Linear(m.weight.shape[0], m.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                lin.bias.copy_(m.bias)
            model.set_submodule(name, lin)
    return model


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}


def test_all_linear_targets_the_conv1d_layers():
    model = gpt2()
    assert adapters.find_targets(model, "all-linear") == [f"transformer.h.{i}.{m}" for i in range(2) for m in CONV]
    assert adapters.find_targets(model, "c_attn") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv1d_adapter_equals_the_linear_one_through_merge_and_unmerge(variant):
    x, base = ids(), gpt2()
    ours, ref = copy.deepcopy(base), as_linears(base)
    before = conv_weights(ours)
    for m in (ours, ref):
        adapters.apply(m, r=4, target="all-linear", **VARIANTS[variant])
        perturb(m, std=0.05)
    # same factors (inits from the transposed weight, e.g. PiSSA's SVD and DoRA's row norms), same residual base
    theirs = {k: v for k, v in ref.state_dict().items()}
    for k, v in ours.state_dict().items():
        want = theirs[k].t() if v.dim() == 2 and k.endswith("base_layer.weight") else theirs[k]
        assert torch.allclose(v, want, atol=1e-6), k
    y = logits(ours, x)
    assert torch.allclose(y, logits(ref, x), atol=1e-5)
    assert not torch.allclose(y, logits(base, x), atol=1e-3)
    if variant in ROUTED:  # per-token routing: no single Delta W to merge
        return
    adapters.merge(ours)
    adapters.merge(ref)
    assert torch.allclose(logits(ours, x), y, atol=1e-5)
    for path in adapters.adapter_layers(ours):
        w = ours.get_submodule(path).base_layer.weight
        assert torch.allclose(w, ref.get_submodule(path).base_layer.weight.t(), atol=1e-6)
    adapters.unmerge(ours)
    assert torch.allclose(logits(ours, x), y, atol=1e-5)
    if variant not in ("pissa", "olora"):  # the residual inits keep W - s B0 A0 as their base
        after = conv_weights(adapters.merge_and_unload(copy.deepcopy(ours).eval(), []))
        assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in before.items())
    unloaded = adapters.merge_and_unload(ours)
    assert all(is_conv1d(unloaded.get_submodule(f"transformer.h.0.{m}")) for m in CONV)
    assert torch.allclose(logits(unloaded, x), y, atol=1e-5)


def test_lora_ga_calibrates_on_the_conv1d_gradient_in_the_linear_convention():
    x, base = ids(), gpt2()
    ours, ref = copy.deepcopy(base), as_linears(base)
    for m in (ours, ref):
        adapters.init_lora_ga(m, [x], r=2, target="all-linear")
    path = "transformer.h.1.mlp.c_fc.default"
    a, b = (dict(m.named_modules())["transformer.h.1.mlp.c_fc"].adapters["default"] for m in (ours, ref))
    assert torch.allclose(a.lora_A, b.lora_A, atol=1e-5) and torch.allclose(a.lora_B, b.lora_B, atol=1e-5), path
    assert torch.allclose(logits(ours, x), logits(ref, x), atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa", "vera", "randlora"])
def test_gpt2_adapter_loads_in_peft_with_fan_in_fan_out_and_back(tmp_path, variant):
    from peft import PeftModel

    x, model = ids(), gpt2()
    adapters.apply(model, r=4, target="all-linear", **VARIANTS[variant])
    perturb(model, std=0.05)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == sorted(adapters.find_targets(gpt2(),
                                                                                                         "all-linear"))
    y = logits(model, x)
    peft_model = PeftModel.from_pretrained(gpt2(), str(tmp_path)).eval()
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    assert torch.allclose(logits(peft_model, x), y, atol=1e-5)
    assert torch.allclose(logits(adapters.load_adapter(gpt2(), tmp_path), x), y, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
def test_peft_gpt2_adapter_loads_here_with_same_logits(tmp_path, variant):
    from peft import LoraConfig, VeraConfig, get_peft_model

    x = ids()
    targets = ["c_attn", "c_proj", "c_fc"]
    config = (VeraConfig(r=8, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
              if variant == "vera" else
              LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False,
                         use_dora=variant == "dora", task_type="CAUSAL_LM"))
    peft_model = get_peft_model(gpt2(), config).eval()
    perturb(peft_model, std=0.05)
    peft_model.save_pretrained(str(tmp_path))
    expected = logits(peft_model, x)
    assert not torch.allclose(expected, logits(gpt2(), x), atol=1e-3)
    model = adapters.load_adapter(gpt2(), tmp_path)
    assert len(adapters.adapter_layers(model)) == 8
    assert torch.allclose(logits(model, x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A saved tiny GPT-2 with its own tokenizer (the new user's ``--model DIR``)."""
    import random

    from transformers import GPT2Config, GPT2LMHeadModel

    from rankwise.data.tokenizer import as_transformers, train_tokenizer

    rng = random.Random(0)
    words = "river stone lantern orbit velvet copper meadow signal harbor".split()
    tok = as_transformers(train_tokenizer([" ".join(rng.choice(words) for _ in range(30)) for _ in range(100)], 300))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("gpt2") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _train(folder, out, *flags):
    args = ["train", "--model", str(folder), "--steps", "4", "--seq-len", "32", "--batch-size", "4",
            "--eval-batches", "2", "--lr", "1e-2", "--warmup-steps", "0", "--dtype", "fp32", "--out", str(out), *flags]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_a_saved_gpt2_with_lora_then_continue_from_the_run(gpt2_folder, tmp_path):
    """``--method lora`` on GPT-2: the default target (no q_proj / v_proj) becomes every Conv1D; the run's merged
    weights are where a second run starts."""
    first = _train(gpt2_folder, tmp_path / "lora", "--method", "lora")
    assert first["final_eval_loss"] < first["initial_eval_loss"]
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and len(config["target_modules"]) == 8
    assert first["trainable_params"] == 2 * sum(8 * (i + o) for i, o in ((32, 96), (32, 32), (32, 128), (128, 32)))
    second = _train(tmp_path / "lora", tmp_path / "dora", "--method", "dora")
    assert second["initial_eval_loss"] == pytest.approx(first["final_eval_loss"], abs=1e-5)


def test_train_a_saved_gpt2_with_galore(gpt2_folder, tmp_path):
    metrics = _train(gpt2_folder, tmp_path / "galore", "--method", "galore", "--rank", "4")
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]


def test_lora_on_a_plain_mlp_trains_and_merges():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    get("lora", r=2).prepare(mlp)  # the CLI's default target on a model without q_proj / v_proj: all-linear
    assert sorted(adapters.adapter_layers(mlp)) == ["0", "2", "4"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    opt = torch.optim.AdamW([p for p in mlp.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(mlp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        out = mlp(x)
        adapters.merge_and_unload(mlp)
        assert all(type(m) is nn.Linear for m in mlp if not isinstance(m, nn.ReLU))
        assert torch.allclose(mlp(x), out, atol=1e-5)
