"""Checks shared by the VeRA and RandLoRA interop tests (methods with frozen random bases shared by all layers)."""

from __future__ import annotations

import torch
from peft_helpers import LOGIT_TOL, TARGET, logits, max_diff, peft_loaded, peft_saved, perturb, rankwise_loaded, tokens
from ref_model import loss_of, tiny_llama

from rankwise import adapters


def fresh_pair(method: str, peft_config, **options):
    """(rankwise model, PEFT model) with freshly initialized adapters on the same base."""
    from peft import get_peft_model

    ours = tiny_llama(0)
    adapters.apply(ours, method, target=TARGET, **options)
    return ours, get_peft_model(tiny_llama(0), peft_config)


def layer_tensors(ours, peft, names: tuple[str, ...]):
    """Yield (module path, name, ours, PEFT's) for every adapted layer and tensor name."""
    for path, layer in adapters.adapter_layers(ours).items():
        theirs = peft.base_model.model.get_submodule(path)
        for name in names:
            yield path, name, getattr(layer.adapters["default"], name), getattr(theirs, name)["default"]


def check_peft_to_rankwise(config, path) -> float:
    trained = peft_saved(config, path)
    expected = peft_loaded(path)
    assert max_diff(expected, trained) == 0.0 and max_diff(expected, logits(tiny_llama(0))) > 1e-3
    _, ours = rankwise_loaded(path)
    return max_diff(ours, expected)


def check_rankwise_to_peft(method: str, path, peft_type: str, **options) -> float:
    model = tiny_llama(0)
    adapters.apply(model, method, target=TARGET, **options)
    perturb(model)
    ours = logits(model)
    assert max_diff(ours, logits(tiny_llama(0))) > 1e-3
    adapters.save_adapter(model, path)
    import json

    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == peft_type
    assert max_diff(rankwise_loaded(path)[1], ours) <= LOGIT_TOL
    return max_diff(peft_loaded(path), ours)


def check_gradients(config, path, names: tuple[str, ...]) -> None:
    """Same trained adapter on both sides: the loss gradients of every trainable tensor agree (backward too)."""
    from peft import PeftModel

    peft_saved(config, path)
    ours, _ = rankwise_loaded(path)
    theirs = PeftModel.from_pretrained(tiny_llama(0), str(path), is_trainable=True)
    batch = torch.cat([tokens(), tokens(1)[:, :1]], dim=1)
    for m in (ours, theirs):
        loss_of(m, batch).backward()
    for path_, name, a, b in layer_tensors(ours, theirs, names):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), (path_, name)
