"""LoRA on a 4-bit (and 8-bit) base lowers the validation loss when fine-tuning the pre-trained tiny base on a new
domain, and tracks LoRA on the full-precision base (``pretrained_tiny``: tests/conftest.py)."""

from __future__ import annotations

import pytest
from rankwise_testing import quick_config

from rankwise import quant
from rankwise.train import train

CFG = dict(method="lora", method_options={"r": 8, "target": "all-linear"}, steps=12, warmup_steps=2, eval_batches=2)


@pytest.fixture(scope="module")
def code_corpus(corpus):
    from rankwise.data import prepare

    return prepare("stdlib-code", tokenizer=corpus.tokenizer)


def test_lora_on_an_nf4_base_lowers_validation_loss(pretrained_tiny, code_corpus):
    result = train(quick_config(**CFG, quantize="nf4"), model=pretrained_tiny(), corpus=code_corpus)
    m = result.metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 1e-2, m
    assert len(quant.quantized_layers(result.model)) == 4 * 7  # every block linear; not the output layer


@pytest.mark.slow
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_lora_on_a_quantized_base_tracks_lora_on_the_full_precision_base(scheme, pretrained_tiny, code_corpus):
    quantized = train(quick_config(**CFG, quantize=scheme), model=pretrained_tiny(), corpus=code_corpus).metrics
    dense = train(quick_config(**CFG), model=pretrained_tiny(), corpus=code_corpus).metrics
    assert quantized["final_eval_loss"] < quantized["initial_eval_loss"] - 1e-2, quantized
    tolerance = {"nf4": 0.05, "int8": 0.01}[scheme]  # the quantization error's effect on the losses
    for key in ("initial_eval_loss", "final_eval_loss"):
        assert abs(quantized[key] - dense[key]) < tolerance
