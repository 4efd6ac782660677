"""What the analyses read: a model (preset, transformers folder, or a ``rankwise train`` run) and token batches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RankwiseError


@dataclass
class LoadedModel:
    model: nn.Module
    data: str          # the corpus the model was trained on (a run's), else the default corpus
    vocab_size: int    # vocabulary of a new BPE, when the model has no tokenizer of its own (a preset)
    tokenizer: Any = None  # the model's own transformers tokenizer (a run's, a folder's); None: train a BPE


def load_model(spec: str, data: str | None = None, vocab_size: int = 8192, seed: int = 0) -> LoadedModel:
    """``spec``: a preset name (random init), a transformers folder (``config.json`` [+ weights]) or the ``--out``
    folder of ``rankwise train`` (its method is re-applied, its checkpoint loaded, then adapters are merged and
    reparameterized layers made dense: the function it computes, as plain linear layers). The model's own tokenizer
    comes with it (a run's or a folder's); only a preset or a config-only folder pairs with a new BPE."""
    from ..data import prepare
    from ..models import PRESETS, build_model, is_run, model_tokenizer, plain_model
    from ..train import load_run

    if is_run(spec):
        run = load_run(spec)
        return LoadedModel(plain_model(run.model), data or run.config.data, run.config.vocab_size, run.tokenizer)
    if spec not in PRESETS and not os.path.isdir(spec):
        raise RankwiseError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}), a transformers model "
                            "folder nor a `rankwise train --out` folder")
    if spec not in PRESETS:
        from ..models import check_model_folder, has_weights
        from ..paths import run_files

        if run_files(spec) and not os.path.exists(os.path.join(spec, "config.json")):
            raise RankwiseError(f"--model {spec!r} is a `rankwise train` folder without {ckpt.CHECKPOINT_FILE}; "
                                "give a run that saved a checkpoint")
        check_model_folder(spec)
        if not has_weights(spec):
            raise RankwiseError(f"--model {spec!r} holds a config.json but no weights (model.safetensors or "
                                "pytorch_model.bin); give a trained model, or a preset name for a random init")
    data = data or "stdlib-docs"
    tokenizer = model_tokenizer(spec)
    vocab = (prepare(data, vocab_size).vocab_size if tokenizer is None
             else tokenizer.backend_tokenizer.get_vocab_size())
    return LoadedModel(build_model(spec, vocab_size=vocab, seed=seed), data, vocab_size, tokenizer)


def token_batches(data: str, vocab_size: int, n: int, batch_size: int, seq_len: int, split: str = "train",
                  seed: int = 0, tokenizer: Any = None) -> list[torch.Tensor]:
    """``n`` batches of (batch_size, seq_len + 1) token ids from ``data``, tokenized with ``tokenizer`` (the
    model's own) or else a BPE of ``vocab_size`` (training batches are the training loop's own deterministic
    draws; ``split="val"`` gives its evaluation windows)."""
    from ..data import Batches, prepare

    for name, v in (("batches", n), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise RankwiseError(f"{name} must be a positive integer, got {v!r}")
    corpus = prepare(data, vocab_size, tokenizer=tokenizer)
    source = Batches(corpus.split(split), batch_size, seq_len, seed)
    if split == "val":
        return source.eval_batches(n)
    return [source.train_batch(i) for i in range(n)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over ``batches`` (fp32)."""
    from ..train import evaluate
    from ..train import perplexity as exp_loss

    return exp_loss(evaluate(model, batches, next(model.parameters()).device, "fp32"))  # inf, not an overflow
