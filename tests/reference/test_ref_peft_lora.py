"""LoRA files both ways against peft 0.21.2 (the reference: peft/tuners/lora/{layer,model,config}.py), on the tiny
LLaMA with square and rectangular targets: logits equal to PEFT's within 1e-5, residual inits (PiSSA, PiSSA with
power iterations, OLoRA) loaded the way PEFT loads them, exclude_modules read and written, unsupported keys named,
and the init distributions equal to PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from peft_helpers import (LOAD_SEED, LOGIT_TOL, TARGET, biased_llama, logits, max_diff, peft_loaded, peft_saved,
                          perturb, rankwise_loaded)
from ref_model import tiny_llama
from torch import nn

from rankwise import adapters
from rankwise.errors import RankwiseError

pytest.importorskip("peft")

RESIDUAL = ["pissa", "pissa_niter_2", "olora"]


def lora_config(init, **kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGET, init_lora_weights=init, **kw)


@pytest.mark.parametrize("init, rslora", [(True, False), ("gaussian", False), (False, True)] +
                         [(i, False) for i in RESIDUAL] + [("pissa", True)])
def test_peft_file_loads_with_peft_logits(tmp_path, init, rslora):
    trained = peft_saved(lora_config(init, use_rslora=rslora), tmp_path)
    expected = peft_loaded(tmp_path)
    assert max_diff(expected, trained) == 0.0  # PEFT reproduces its own model (same global seed)
    model, ours = rankwise_loaded(tmp_path)
    assert max_diff(ours, expected) <= LOGIT_TOL
    assert max_diff(expected, logits(tiny_llama(0))) > 1e-2  # the adapter does something
    if init in RESIDUAL:  # the file's factors alone (the old behaviour) are far off: the base must be residual
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
        assert max_diff(rankwise_loaded(tmp_path)[1], expected) > 1e-2


@pytest.mark.parametrize("init", ["default", "gaussian"] + RESIDUAL)
def test_rankwise_file_loads_in_peft_with_same_logits(tmp_path, init):
    model = tiny_llama(0)
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, init=init, seed=3)
    if init in RESIDUAL:  # the residual base keeps the function at init
        assert max_diff(logits(model), logits(tiny_llama(0))) < 1e-5
    perturb(model)
    ours = logits(model)
    adapters.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == (8 if init in RESIDUAL else 4)
    assert max_diff(peft_loaded(tmp_path), ours) <= LOGIT_TOL
    assert max_diff(rankwise_loaded(tmp_path)[1], ours) <= LOGIT_TOL


@pytest.mark.parametrize("init", RESIDUAL)
def test_peft_residual_file_round_trips_through_rankwise(tmp_path, init):
    peft_saved(lora_config(init), tmp_path / "peft")
    expected = peft_loaded(tmp_path / "peft")
    model, _ = rankwise_loaded(tmp_path / "peft")
    adapters.save_adapter(model, tmp_path / "ours")  # rank-2r LoRA relative to the original base
    assert max_diff(peft_loaded(tmp_path / "ours"), expected) <= LOGIT_TOL


def _adapted(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("exclude", [["0.mlp.up_proj", "k_proj"], r".*layers\.1\.self_attn\..*"])
def test_exclude_modules_both_ways(tmp_path, exclude):
    from peft import PeftModel, get_peft_model

    trained = peft_saved(lora_config(True, exclude_modules=exclude), tmp_path / "peft")
    model, ours = rankwise_loaded(tmp_path / "peft")
    assert max_diff(ours, trained) <= LOGIT_TOL
    peft_targets = _adapted(get_peft_model(tiny_llama(0), lora_config(True, exclude_modules=exclude)))
    assert set(adapters.adapter_layers(model)) == peft_targets and len(peft_targets) < 8

    model = tiny_llama(0)
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, exclude=exclude)
    assert set(adapters.adapter_layers(model)) == peft_targets
    perturb(model)
    adapters.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == (sorted(exclude) if isinstance(exclude, list) else exclude)
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "ours"))
    assert _adapted(loaded) == peft_targets
    assert max_diff(logits(loaded.eval()), logits(model)) <= LOGIT_TOL


@pytest.mark.parametrize("field, kw", [("trainable_token_indices", dict(trainable_token_indices=[1, 2, 3])),
                                       ("layer_replication", dict(layer_replication=[[0, 2], [1, 2]]))])
def test_unsupported_peft_keys_are_named(tmp_path, field, kw):
    peft_saved(lora_config(True, **kw), tmp_path)
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=f"sets {field}=.*rankwise does not support"):
        adapters.load_adapter(model, tmp_path)
    assert not adapters.adapter_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_init_distributions_match_peft():
    """PEFT's inits (reset_lora_parameters): A ~ kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(in)), or N(0, 1/r^2) for
    "gaussian"; B = 0. Compared on a 2048-wide layer (32768 draws: std estimated to ~0.4%)."""
    from peft import LoraConfig, get_peft_model

    r, width = 16, 2048

    def a_of(init, ours):
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(width, 256))
        if ours:
            adapters.apply(model, "lora", r=r, target=["proj"], init=init)
            lora = model.proj.adapters["default"]
            return lora.lora_A.detach(), lora.lora_B.detach()
        torch.manual_seed(LOAD_SEED)
        peft = get_peft_model(model, LoraConfig(r=r, target_modules=["proj"], init_lora_weights=init))
        layer = peft.base_model.model.proj
        return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()

    for init, peft_init, std in (("gaussian", "gaussian", 1 / r), ("default", True, 1 / (3 * width) ** 0.5)):
        (a, b), (pa, pb) = a_of(init, True), a_of(peft_init, False)
        assert a.shape == pa.shape and torch.equal(b, pb) and not b.any()
        assert abs(a.std().item() / std - 1) < 0.02 and abs(pa.std().item() / std - 1) < 0.02
        assert abs(a.mean().item()) < 0.05 * std and abs(pa.mean().item()) < 0.05 * std
        if init == "default":
            bound = 1 / width ** 0.5
            assert a.abs().max() <= bound and pa.abs().max() <= bound and a.abs().max() > 0.99 * bound


PATTERNS = dict(rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"down_proj": 3.0})


@pytest.mark.parametrize("init", [True, "pissa"])
def test_rank_and_alpha_patterns_both_ways(tmp_path, init):
    from peft import PeftModel

    trained = peft_saved(lora_config(init, **PATTERNS), tmp_path / "peft")
    model, ours = rankwise_loaded(tmp_path / "peft")
    assert max_diff(ours, peft_loaded(tmp_path / "peft")) <= LOGIT_TOL and max_diff(ours, trained) <= LOGIT_TOL
    ranks = {p: (a.r, a.alpha) for p, a in ((p, layer.adapters["default"])
                                           for p, layer in adapters.adapter_layers(model).items())}
    assert ranks["model.layers.0.self_attn.k_proj"] == (2, 8.0) and ranks["model.layers.1.mlp.up_proj"] == (6, 8.0)
    assert ranks["model.layers.0.mlp.up_proj"] == (4, 8.0) and ranks["model.layers.1.mlp.down_proj"] == (4, 3.0)

    model = tiny_llama(0)
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, init={True: "default"}.get(init, init), **PATTERNS)
    perturb(model)
    adapters.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    scale = 2 if init == "pissa" else 1  # residual inits are written with rank 2r, alpha 2 alpha
    assert config["r"] == 4 * scale and config["rank_pattern"]["model.layers.1.mlp.up_proj"] == 6 * scale
    assert config["alpha_pattern"]["model.layers.0.mlp.down_proj"] == 3.0 * scale
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "ours")).eval()
    assert max_diff(logits(loaded), logits(model)) <= LOGIT_TOL
    assert max_diff(rankwise_loaded(tmp_path / "ours")[1], logits(model)) <= LOGIT_TOL


def test_pattern_naming_no_module_is_refused():
    with pytest.raises(RankwiseError, match="rank_pattern key 'o_proj' matches none of the 8 target modules"):
        adapters.apply(tiny_llama(0), "lora", r=4, target=TARGET, rank_pattern={"o_proj": 2})


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_both_ways(tmp_path, bias):
    from peft import get_peft_model

    trained = peft_saved(lora_config(True, bias=bias), tmp_path / "peft", make=biased_llama)
    model, ours = rankwise_loaded(tmp_path / "peft", make=biased_llama)
    assert max_diff(ours, trained) <= LOGIT_TOL
    assert max_diff(ours, peft_loaded(tmp_path / "peft", biased_llama)) <= LOGIT_TOL
    peft_trainable = {n.removeprefix("base_model.model.") for n, p in
                      get_peft_model(biased_llama(), lora_config(True, bias=bias)).named_parameters()
                      if p.requires_grad and n.endswith("bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")} == peft_trainable

    model = biased_llama()
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, bias=bias)
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")} == peft_trainable
    perturb(model)
    adapters.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
    assert max_diff(peft_loaded(tmp_path / "ours", biased_llama), logits(model)) <= LOGIT_TOL
    assert max_diff(rankwise_loaded(tmp_path / "ours", biased_llama)[1], logits(model)) <= LOGIT_TOL


def test_modules_to_save_both_ways(tmp_path):
    """PEFT's ModulesToSaveWrapper (peft/utils/other.py): full trained copies, matched by name suffix ("norm" also
    takes input_layernorm / post_attention_layernorm), saved under the module's own keys."""
    from peft import PeftModel, get_peft_model

    saved = ["lm_head", "norm"]
    trained = peft_saved(lora_config(True, modules_to_save=saved), tmp_path / "peft")
    model, ours = rankwise_loaded(tmp_path / "peft")
    assert max_diff(ours, trained) <= LOGIT_TOL
    with adapters.disable_adapters(model):  # the original modules come back
        assert max_diff(logits(model), logits(tiny_llama(0))) == 0.0
    peft_copies = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", "") for n, p in
                   get_peft_model(tiny_llama(0), lora_config(True, modules_to_save=saved)).named_parameters()
                   if p.requires_grad and "lora_" not in n}

    model = tiny_llama(0)
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, modules_to_save=saved)
    ours_copies = {n.replace(".copies.default", "") for n, p in model.named_parameters()
                   if p.requires_grad and ".adapters." not in n}
    assert ours_copies == peft_copies and len(peft_copies) == 6
    perturb(model)
    expected = logits(model)
    adapters.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == saved
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "ours")).eval()
    assert max_diff(logits(loaded), expected) <= LOGIT_TOL
    assert max_diff(logits(adapters.merge_and_unload(model)), expected) <= LOGIT_TOL
    with pytest.raises(RankwiseError, match="modules_to_save entry 'score' matches no module"):
        adapters.apply(tiny_llama(0), "lora", target=TARGET, modules_to_save=["score"])


@pytest.mark.parametrize("init, make", [(True, tiny_llama), ("pissa", tiny_llama), (True, biased_llama)])
def test_dora_both_ways(tmp_path, init, make):
    """PEFT's DoRA (peft/tuners/lora/dora.py DoraLinearLayer): out + (g - 1) W x + g s B A x with
    g = m / ||W + s B A|| (norm detached), m = lora_magnitude_vector."""
    from peft import PeftModel

    trained = peft_saved(lora_config(init, use_dora=True), tmp_path / "peft", make=make)
    model, ours = rankwise_loaded(tmp_path / "peft", make=make)
    assert max_diff(ours, trained) <= LOGIT_TOL and max_diff(trained, logits(make())) > 1e-3

    model = make()
    adapters.apply(model, "lora", r=4, alpha=8, target=TARGET, dora=True, init={True: "default"}.get(init, init))
    assert max_diff(logits(model), logits(make())) < 1e-5  # m = ||W||: the function is unchanged at init
    perturb(model)
    expected = logits(model)
    adapters.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    assert max_diff(logits(loaded), expected) <= LOGIT_TOL
    adapters.merge(model)
    assert max_diff(logits(model), expected) <= LOGIT_TOL
    adapters.unmerge(model)
    assert max_diff(logits(model), expected) <= LOGIT_TOL


def test_dora_gradients_equal_peft(tmp_path):
    """Same trained DoRA adapter on both sides: equal loss gradients of A, B and m (the norm detached in both)."""
    from peft import PeftModel
    from ref_model import loss_of

    peft_saved(lora_config(True, use_dora=True), tmp_path)
    ours, _ = rankwise_loaded(tmp_path)
    theirs = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path), is_trainable=True)
    batch = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    for m in (ours, theirs):
        loss_of(m, batch).backward()
    for path, layer in adapters.adapter_layers(ours).items():
        mine, ref = layer.adapters["default"], theirs.base_model.model.get_submodule(path)
        pairs = [(mine.lora_A, ref.lora_A["default"].weight), (mine.lora_B, ref.lora_B["default"].weight),
                 (mine.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight)]
        for a, b in pairs:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), path
