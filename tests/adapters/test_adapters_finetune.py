"""Every adapter method lowers the validation loss when fine-tuning the pre-trained tiny base (``pretrained_tiny``,
trained on the stdlib docstrings) on a new domain: the held-out split of the stdlib code corpus, same tokenizer."""

from __future__ import annotations

import pytest
from rankwise_testing import quick_config

from rankwise.models import count_params
from rankwise.train import train

# each with its defaults (r=8 q_proj,v_proj; VeRA r=256); lr is the loop's 2e-3 times the method's lr_scale
VARIANTS = ["lora", "rslora", "dora", "pissa", "lora-ga", "lora-xs", "lora-sb", "nola", "vera", "randlora", "lora-pro",
            "lora-pro-lite", "altlora"]


@pytest.fixture(scope="session")
def code_corpus(corpus):
    from rankwise.data import prepare

    return prepare("stdlib-code", tokenizer=corpus.tokenizer)


@pytest.mark.parametrize("method", VARIANTS)
def test_every_variant_lowers_validation_loss(method, pretrained_tiny, code_corpus):
    base = pretrained_tiny()
    total = count_params(base)[1]
    result = train(quick_config(method=method, steps=12, warmup_steps=2, eval_batches=2, lr=2e-3), model=base,
                   corpus=code_corpus)
    m = result.metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 1e-3, m
    trainable, frozen_total = count_params(result.model)
    assert 0 < trainable < total / 50 and frozen_total >= total
