import math

import pytest
import torch

from analysis_helpers import random_batches, small_llama
from rankwise import adapters
from rankwise.analysis import attention_norms
from rankwise.errors import RankwiseError


def _layer0_qkv(model, batch):
    """X, X W_Q, X W_K of the first attention layer, computed by hand."""
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(batch[:, :-1]))
        attn = model.model.layers[0].self_attn
        return x, attn.q_proj(x), attn.k_proj(x)


def test_norms_match_a_direct_computation():
    model = small_llama()
    batches = random_batches(2, seq=20)
    rows = attention_norms(model, batches)
    assert [r["layer"] for r in rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    r = rows[0]
    xs, qs, ks = zip(*(_layer0_qkv(model, b) for b in batches))
    assert r["x_max"] == pytest.approx(max(x.abs().max().item() for x in xs), rel=1e-6)
    assert r["q_total"] == pytest.approx(max(q.abs().max().item() for q in qs), rel=1e-6)
    assert r["q_base"] == r["q_total"] and r["q_adapter"] == 0.0
    hd, scale = 8, 8 ** -0.5
    assert r["gamma"] == pytest.approx(max(r["q_total"], r["k_total"]) * math.sqrt(scale * hd))
    assert 0 < r["score_max"] <= r["gamma"] ** 2          # |s <q, k>| <= s d ||q||_max ||k||_max
    scores = max((scale * q.reshape(2, 20, 4, hd).transpose(1, 2) @ k.reshape(2, 20, 4, hd).permute(0, 2, 3, 1))
                 .abs().max().item() for q, k in zip(qs, ks))
    assert r["score_max"] == pytest.approx(scores, rel=1e-5)
    assert r["seq_len"] == 20 and r["threshold"] == pytest.approx(math.sqrt(math.log(20)))
    assert r["ratio"] == pytest.approx(r["gamma"] / r["threshold"])


def test_adapter_part_and_the_threshold_flag():
    model = small_llama(seed=3)
    adapters.apply(model, method="lora", r=2, alpha=4, target=["q_proj"])
    for layer in adapters.adapter_layers(model).values():
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.5)
    r = attention_norms(model, random_batches(1, seq=16))[0]
    assert r["q_adapter"] > 0 and r["k_adapter"] == 0.0
    assert r["q_total"] <= r["q_base"] + r["q_adapter"] + 1e-6
    # shrinking W_Q and W_K by c shrinks Gamma by c: from above the threshold to below it
    before = attention_norms(small_llama(seed=4), random_batches(1, seq=16))[0]
    shrunk = small_llama(seed=4)
    with torch.no_grad():
        for layer in shrunk.model.layers:
            layer.self_attn.q_proj.weight.mul_(0.05)
            layer.self_attn.k_proj.weight.mul_(0.05)
    after = attention_norms(shrunk, random_batches(1, seq=16))[0]
    assert after["gamma"] == pytest.approx(0.05 * before["gamma"], rel=1e-5)
    assert after["below_threshold"] and after["degree"] <= before["degree"]


def test_bad_inputs():
    with pytest.raises(RankwiseError, match="q_proj"):
        attention_norms(torch.nn.Linear(2, 2), random_batches(1))
    with pytest.raises(RankwiseError, match="at least one batch"):
        attention_norms(small_llama(), [])
