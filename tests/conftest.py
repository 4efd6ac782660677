"""Session fixtures shared by every test: a private data cache, the embedded corpus, a pre-trained tiny base."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rankwise_testing import quick_config


@pytest.fixture(scope="session", autouse=True)
def rankwise_cache(tmp_path_factory):
    """Every test session builds its corpus and tokenizer in a fresh cache (hermetic, ~2 s)."""
    path = tmp_path_factory.mktemp("rankwise-cache")
    old = os.environ.get("RANKWISE_CACHE")
    os.environ["RANKWISE_CACHE"] = str(path)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield path
    if old is None:
        os.environ.pop("RANKWISE_CACHE", None)
    else:
        os.environ["RANKWISE_CACHE"] = old


@pytest.fixture(scope="session")
def corpus(rankwise_cache):
    from rankwise.data import prepare

    return prepare()


@pytest.fixture(scope="session")
def pretrained_tiny(corpus):
    """A factory of fresh copies of the tiny preset pre-trained full-rank for 150 steps (trained once a session).

    Fine-tuning tests start from it: ``model = pretrained_tiny()``.
    """
    from rankwise.train import train

    result = train(quick_config(steps=150, lr=3e-3, warmup_steps=10), corpus=corpus)
    state = copy.deepcopy(result.model.state_dict())
    model = result.model

    def fresh() -> torch.nn.Module:
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    fresh.initial_eval_loss = result.metrics["final_eval_loss"]
    return fresh
