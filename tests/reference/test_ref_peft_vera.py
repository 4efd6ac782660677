"""VeRA against peft 0.21.2 (the reference: peft/tuners/vera/{model,layer,config}.py): one pair of Kaiming-uniform
bases from ``projection_prng_key`` sized to the largest target dims and sliced per layer, no alpha / r factor, files
both ways with logits within 1e-5 (stored bases, and bases regenerated from the key), equal gradients."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import LOGIT_TOL, TARGET
from peft_shared import check_gradients, check_peft_to_rankwise, check_rankwise_to_peft, fresh_pair, layer_tensors

pytest.importorskip("peft")


def vera_config(**kw):
    from peft import VeraConfig

    return VeraConfig(r=8, target_modules=TARGET, **kw)


@pytest.mark.parametrize("key", [0, 5])
def test_bases_and_init_equal_peft(key):
    ours, peft = fresh_pair("vera", vera_config(projection_prng_key=key), r=8, shared_seed=key)
    a, b = peft.base_model.vera_A["default"], peft.base_model.vera_B["default"]
    assert a.shape == (8, 96) and b.shape == (96, 8)  # largest in / out over q, k, up, down
    for path, name, mine, theirs in layer_tensors(ours, peft, ("vera_lambda_b", "vera_lambda_d")):
        assert torch.equal(mine, theirs), (path, name)
    for layer in ours.modules():
        if hasattr(layer, "vera_A"):
            assert torch.equal(layer.vera_A, a) and torch.equal(layer.vera_B, b)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_file_loads_with_peft_logits(tmp_path, save_projection):
    assert check_peft_to_rankwise(vera_config(save_projection=save_projection, projection_prng_key=3),
                                  tmp_path) <= LOGIT_TOL


def test_rankwise_file_loads_in_peft_with_same_logits(tmp_path):
    from safetensors.torch import load_file

    assert check_rankwise_to_peft("vera", tmp_path, "VERA", r=8, shared_seed=3) <= LOGIT_TOL
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(keys)  # PEFT's save_projection=True layout
    assert not any(k.endswith(".vera_A") and k.startswith("base_model.model.") for k in keys)


def test_gradients_equal_peft(tmp_path):
    check_gradients(vera_config(), tmp_path, ("vera_lambda_b", "vera_lambda_d"))
