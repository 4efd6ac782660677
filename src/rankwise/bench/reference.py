"""Reference levels: the perplexity of n-gram statistics of the training split on the models' validation tokens.

Evaluated on exactly the tokens the models are scored on (the targets of the first ``eval_batches`` validation
windows), with counts from the training split (vocabulary V, N training tokens):

- unigram, add-one (Laplace) smoothing: ``p(w) = (c(w) + 1) / (N + V)``;
- bigram, Witten-Bell interpolation with that unigram (Witten & Bell 1991; Chen & Goodman 1998, eq. 17):
  ``p(w | v) = (c(v, w) + T(v) p(w)) / (c(v) + T(v))``, where ``c(v)`` counts ``v`` as a predecessor and ``T(v)`` is
  the number of distinct words seen after it (``p(w)`` when ``v`` was never seen). The predecessor of a window's
  first target is its input token, as for the models.

A model that has learnt less than these is only reproducing token frequencies (or pairs of them).
"""

from __future__ import annotations

import math

import numpy as np

from ..data import Batches, TokenizedCorpus


def ngram_reference(corpus: TokenizedCorpus, batch_size: int, seq_len: int, eval_batches: int) -> dict[str, float]:
    """``{"unigram": ppl, "bigram": ppl, "eval_tokens": n}`` on the models' validation targets."""
    V = corpus.vocab_size
    train = np.asarray(corpus.train, dtype=np.int64)
    counts = np.bincount(train, minlength=V).astype(np.float64)
    p_uni = (counts + 1) / (len(train) + V)
    windows = Batches(corpus.val, batch_size, seq_len).eval_batches(eval_batches)
    prev = np.concatenate([w[:, :-1].reshape(-1).numpy() for w in windows])
    target = np.concatenate([w[:, 1:].reshape(-1).numpy() for w in windows])
    pairs = train[:-1] * V + train[1:]
    keys, pair_counts = np.unique(pairs, return_counts=True)
    c_prev = np.bincount(train[:-1], minlength=V).astype(np.float64)
    t_prev = np.bincount(keys // V, minlength=V).astype(np.float64)
    query = prev * V + target
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    c_pair = np.where(keys[pos] == query, pair_counts[pos], 0).astype(np.float64)
    denom = c_prev[prev] + t_prev[prev]
    p_bi = np.where(denom > 0, (c_pair + t_prev[prev] * p_uni[target]) / np.maximum(denom, 1), p_uni[target])
    return {"unigram": math.exp(-np.log(p_uni[target]).mean()), "bigram": math.exp(-np.log(p_bi).mean()),
            "eval_tokens": int(len(target))}
