"""RandLoRA against peft 0.21.2 (the reference: peft/tuners/randlora/{model,layer,config}.py): one shared A
(r x 1 x min) and B (max x n x r) sized to the largest target dims (Kaiming-uniform in bf16, or ternary sparse /
very sparse), gamma on the min side, scaling alpha / r (640 / r); files both ways with logits within 1e-5 (stored
bases, and bases regenerated from the key), equal gradients, square and both rectangular orientations."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import LOGIT_TOL, TARGET
from peft_shared import check_gradients, check_peft_to_rankwise, check_rankwise_to_peft, fresh_pair, layer_tensors

pytest.importorskip("peft")

MODES = {"kaiming": {}, "sparse": {"sparse": True}, "very_sparse": {"very_sparse": True}}
TRAINED = ("randlora_lambda", "randlora_gamma")


def randlora_config(**kw):
    from peft import RandLoraConfig

    return RandLoraConfig(r=8, target_modules=TARGET, **kw)


@pytest.mark.parametrize("mode", list(MODES))
def test_bases_and_init_equal_peft(mode):
    ours, peft = fresh_pair("randlora", randlora_config(projection_prng_key=2, **MODES[mode]), r=8, alpha=640,
                            shared_seed=2, **MODES[mode])
    a, b = peft.base_model.randlora_A["default"], peft.base_model.randlora_B["default"]
    assert a.shape == (8, 1, 96) and b.shape == (96, 12, 8)
    for path, name, mine, theirs in layer_tensors(ours, peft, TRAINED + ("randlora_A", "randlora_B")):
        assert torch.equal(mine, theirs), (path, name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_file_loads_with_peft_logits(tmp_path, mode, save_projection):
    config = randlora_config(save_projection=save_projection, randlora_alpha=320, **MODES[mode])
    assert check_peft_to_rankwise(config, tmp_path) <= LOGIT_TOL


@pytest.mark.parametrize("mode", list(MODES))
def test_rankwise_file_loads_in_peft_with_same_logits(tmp_path, mode):
    assert check_rankwise_to_peft("randlora", tmp_path, "RANDLORA", r=8, alpha=640, shared_seed=4,
                                  **MODES[mode]) <= LOGIT_TOL


def test_gradients_equal_peft(tmp_path):
    check_gradients(randlora_config(), tmp_path, TRAINED)
