"""LoRA on a 4-bit (and 8-bit) base lowers the validation loss when fine-tuning the pre-trained tiny base on a new
domain, and tracks LoRA on the full-precision base step for step (``pretrained_tiny``: tests/conftest.py)."""

from __future__ import annotations

import pytest
from rankwise_testing import quick_config

from rankwise import quant
from rankwise.train import train


@pytest.fixture(scope="module")
def code_corpus(corpus):
    from rankwise.data import prepare

    return prepare("stdlib-code", tokenizer=corpus.tokenizer)


@pytest.mark.parametrize("scheme", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_lora_on_a_quantized_base_lowers_validation_loss_like_lora(scheme, pretrained_tiny, code_corpus):
    cfg = dict(method="lora", method_options={"r": 8, "target": "all-linear"}, steps=12, warmup_steps=2,
               eval_batches=2)
    quantized = train(quick_config(**cfg, quantize=scheme), model=pretrained_tiny(), corpus=code_corpus)
    m = quantized.metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 1e-2, m
    assert len(quant.quantized_layers(quantized.model)) == 4 * 7  # every block linear; not the output layer
    dense = train(quick_config(**cfg), model=pretrained_tiny(), corpus=code_corpus).metrics
    tolerance = {"nf4": 0.05, "int8": 0.01}[scheme]  # the quantization error's effect on the losses
    assert abs(m["final_eval_loss"] - dense["final_eval_loss"]) < tolerance
    assert abs(m["initial_eval_loss"] - dense["initial_eval_loss"]) < tolerance
