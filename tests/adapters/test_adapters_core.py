"""Injection, zero-init identity, merge/unmerge, multiple adapters, parameter counts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_helpers import KINDS, clone, logits, perturb, small_model, tokens

from rankwise import adapters
from rankwise.adapters import AdapterLinear
from rankwise.errors import RankwiseError
from rankwise.models import count_params

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_leaves_logits_unchanged_and_base_frozen(kind):
    model, x = small_model(), tokens()
    ref = logits(model, x)
    adapters.apply(model, kind, r=4, target="all-linear")
    assert torch.equal(logits(model, x), ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)


@pytest.mark.parametrize("kind", KINDS + ["rslora"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model, x = small_model(), tokens()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {"rslora": True} if kind == "rslora" else {}
    adapters.apply(model, "lora" if kind == "rslora" else kind, r=4, alpha=8, target="all-linear", **options)
    perturb(model)
    adapted = logits(model, x)
    assert not torch.allclose(adapted, logits(small_model(), x), atol=1e-3)  # the adapter does something
    adapters.merge(model)
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    adapters.unmerge(model)
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    for name, w in base_weights.items():
        path = name.replace("_proj.weight", "_proj.base_layer.weight")
        assert torch.allclose(model.get_parameter(path), w, atol=1e-6), name


@pytest.mark.parametrize("kind", KINDS)
def test_fused_forward_matches_delta_weight(kind):
    model = small_model()
    adapters.apply(model, kind, r=4, target=["q_proj"])
    perturb(model)
    for layer in adapters.adapter_layers(model).values():
        a = layer.adapters["default"]
        x = torch.randn(3, 5, layer.in_features)
        out = torch.randn(3, 5, layer.out_features)
        assert torch.allclose(a(x, out), out + x @ a.delta_weight().T, atol=1e-5)


def _count(model, kind, r, **options):
    adapters.apply(model, kind, r=r, target="all-linear", **options)
    return count_params(model)[0]


def test_trainable_counts_equal_formulas():
    shapes = [(m.in_features, m.out_features) for n, m in small_model().named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    r = 4
    assert _count(small_model(), "lora", r) == sum(r * (i + o) for i, o in shapes)
    assert _count(small_model(), "lora-xs", r) == len(shapes) * r * r
    assert _count(small_model(), "vera", r) == sum(r + o for i, o in shapes)
    # PEFT's RandLoRA: gamma on the min side, n = ceil(min / r) bases
    assert _count(small_model(), "randlora", r) == sum(math.ceil(min(i, o) / r) * (r + min(i, o)) for i, o in shapes)
    nola = [_count(small_model(), "nola", rank, num_bases=32) for rank in (2, 8, 16)]
    assert nola == [len(shapes) * 2 * 32] * 3  # independent of r


def test_targets_names_regex_all_linear():
    names = lambda t: sorted(adapters.find_targets(small_model(), t))  # noqa: E731
    assert names(["q_proj", "v_proj"]) == names("q_proj,v_proj") == names(r".*\.(q|v)_proj")
    assert len(names("q_proj,v_proj")) == 4
    all_linear = names("all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 2 * 7


def test_unmatched_target_lists_candidates():
    with pytest.raises(RankwiseError, match="candidate module names: .*gate_proj.*q_proj"):
        adapters.apply(small_model(), "lora", target=["query"])
    with pytest.raises(RankwiseError, match="neither a list of module names nor a valid regex"):
        adapters.apply(small_model(), "lora", target="q_proj[")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope"), "unknown adapter method 'nope'; valid: "),
    (dict(r=0), "rank r must be a positive integer"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(method="lora", init="svd"), "unknown LoRA init"),
    (dict(method="lora", bogus=1), "bad option for adapter method 'lora'"),
    (dict(method="lora-xs", r=65), "larger than min"),
])
def test_bad_options(kwargs, message):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        adapters.apply(model, **{"target": ATTN, **kwargs})
    assert not adapters.adapter_layers(model) and model.state_dict().keys() == before.keys()


def test_several_named_adapters_set_adapter_and_disable():
    model, x = small_model(), tokens()
    base = logits(model, x)
    adapters.apply(model, "lora", r=4, target=ATTN, adapter_name="a")
    perturb(model, seed=1)
    only_a = logits(model, x)
    adapters.apply(model, "vera", r=4, target=["q_proj", "gate_proj"], adapter_name="b")
    perturb(model, seed=2)
    only_b = logits(model, x)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"b"}
    adapters.set_adapter(model, "a")
    assert torch.equal(logits(model, x), only_a)
    adapters.set_adapter(model, ["a", "b"])
    both = logits(model, x)
    assert not torch.allclose(both, only_a, atol=1e-4) and not torch.allclose(both, only_b, atol=1e-4)
    with adapters.disable_adapters(model):
        assert torch.equal(logits(model, x), base)
    adapters.merge(model)
    assert torch.allclose(logits(model, x), both, atol=1e-5)
    with adapters.disable_adapters(model):  # merged adapters are taken out for the block
        assert torch.allclose(logits(model, x), base, atol=1e-5)
    assert torch.allclose(logits(model, x), both, atol=1e-5)
    adapters.unmerge(model)
    adapters.delete_adapter(model, "b")
    assert torch.allclose(logits(model, x), only_a, atol=1e-6)
    with pytest.raises(RankwiseError, match="no adapter named 'b'"):
        adapters.set_adapter(model, "b")
    with pytest.raises(RankwiseError, match="already has an adapter named 'a'"):
        adapters.apply(model, "lora", target=ATTN, adapter_name="a")


def test_merge_and_unload_gives_plain_linears():
    model, x = small_model(), tokens()
    adapters.apply(model, "randlora", r=8, target="all-linear")
    perturb(model)
    adapted = logits(model, x)
    adapters.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)


def test_random_bases_regenerated_from_seeds_not_stored():
    a, b, c = small_model(), small_model(), small_model()
    for m, seed in ((a, 0), (b, 0), (c, 1)):
        adapters.apply(m, "nola", r=4, target=ATTN, seed=seed)
        perturb(m)
    keys = set(a.state_dict())
    assert not any("bases" in k for k in keys)
    da = [x.adapters["default"].delta_weight() for x in adapters.adapter_layers(a).values()]
    db = [x.adapters["default"].delta_weight() for x in adapters.adapter_layers(b).values()]
    dc = [x.adapters["default"].delta_weight() for x in adapters.adapter_layers(c).values()]
    assert all(torch.equal(u, v) for u, v in zip(da, db))
    assert not any(torch.allclose(u, v) for u, v in zip(da, dc))
    assert not torch.allclose(da[0], da[1])  # each layer has its own bases
    vera = small_model()
    adapters.apply(vera, "vera", r=4, target=ATTN)
    layers = list(adapters.adapter_layers(vera).values())
    assert layers[0].adapters["default"].vera_A is layers[1].adapters["default"].vera_A  # one pair for all layers
    assert not any("vera_A" in k for k in vera.state_dict())


def test_dropout_only_on_adapter_path_in_training():
    model, x = small_model(), tokens()
    adapters.apply(model, "lora", r=4, target=ATTN, dropout=0.5)
    perturb(model)
    model.eval()
    assert torch.equal(logits(model, x), logits(model, x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(logits(model, x), logits(model, x))
    with adapters.disable_adapters(model):
        assert torch.equal(logits(model, x), logits(clone(small_model()).train(), x))
