"""The registered methods in the training loop: injection, aux loss, balancing, save/load."""

import pytest
import torch

from rankwise_testing import quick_config
from rankwise import adapters, methods
from rankwise.adapters.moe.layers import routed_layers
from rankwise.errors import RankwiseError
from rankwise.models import build_model
from rankwise.train import train


@pytest.mark.parametrize("name,options", [("smora", {"r": 16, "top_k": 4}),
                                          ("mixlora", {"r": 2, "num_experts": 4, "top_k": 2, "aux_coef": 0.1}),
                                          ("flylora", {"r": 16, "top_k": 4})])
def test_methods_train_and_balance(corpus, name, options):
    res = train(quick_config(method=name, method_options=options, steps=3, seq_len=32, batch_size=4,
                             eval_batches=1),
                corpus=corpus)
    model = res.model
    layers = routed_layers(model)
    assert len(layers) == 8  # q_proj and v_proj of the tiny preset's 4 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    for layer in layers.values():
        assert float(layer.usage.sum()) > 0
    if name == "mixlora":
        assert all("aux_loss" in row for row in res.history)
        assert all(row["aux_loss"] >= 0.1 * (1 - 1e-6) for row in res.history)  # Switch loss >= 1
    else:  # the loss-free balancer moved the selection biases
        assert any(float(layer.select_bias.abs().sum()) > 0 for layer in layers.values())
    assert res.metrics["final_eval_loss"] < res.metrics["initial_eval_loss"] + 1e-3


def test_aux_loss_reaches_router_gradient():
    method = methods.get("mixlora", r=2, num_experts=4, top_k=1, aux_coef=1.0)
    model = method.prepare(build_model("tiny", vocab_size=300, seed=0))
    model(input_ids=torch.randint(0, 300, (2, 16)))
    aux = method.aux_loss(model)
    aux.backward()
    for layer in routed_layers(model).values():
        assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    x = torch.randint(0, 300, (2, 16))
    method = methods.get("smora", r=8, top_k=2)
    model = method.prepare(build_model("tiny", vocab_size=300, seed=0))
    for layer in routed_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.select_bias.normal_()
    model.eval()
    expected = model(input_ids=x).logits
    adapters.save_adapter(model, tmp_path / "ad")
    fresh = build_model("tiny", vocab_size=300, seed=0).eval()
    adapters.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(input_ids=x).logits, expected)


def test_bad_method_options():
    with pytest.raises(RankwiseError, match="aux_coef"):
        methods.get("smora", aux_coef=-1.0)
    with pytest.raises(RankwiseError, match="top_k"):
        methods.get("smora", r=4, top_k=8).prepare(build_model("tiny", vocab_size=300))
