"""Tokenized corpora on disk and the batches the training loop reads from them.

``prepare(source)`` splits documents deterministically into train/validation (by a hash of each document, so the
split does not depend on order), tokenizes them with the given tokenizer (a model's own) or, when none is given
(pre-training from scratch), with a byte-level BPE trained on the training split, and writes both splits as flat
``uint16`` (``uint32`` for vocabularies over 65,536) token arrays: each document is ``tokenizer(doc).input_ids``
followed by the end-of-text token (``tokenizer.encode_documents``). Everything is cached under ``$RANKWISE_CACHE``
(default ``~/.cache/rankwise``), keyed by the source's content and the tokenizer's identity, and memory-mapped on
later use.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from ..atomic import write_atomic
from ..errors import RankwiseError
from . import instruct, sources
from .tokenizer import (as_transformers, encode_documents, load_pretrained_tokenizer, save_pretrained_tokenizer,
                        tokenizer_id, train_tokenizer)

FORMAT_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def is_validation(doc: str, val_fraction: float) -> bool:
    """Deterministic split: a document is in validation iff its hash falls in the first ``val_fraction``."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


@dataclass
class TokenizedCorpus:
    """Train/validation token arrays (memory-mapped) and their tokenizer: ``tokenizer`` is the ``tokenizers``
    backend (encode / decode), ``hf_tokenizer`` the transformers tokenizer a run saves (default: ``tokenizer``
    wrapped, with ``<|endoftext|>`` as end-of-text)."""

    source: str
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    directory: Path
    hf_tokenizer: Any = None
    # instruction data (``rankwise.data.instruct``): per split, the loss mask of every token (uint8, 1 = trained)
    # and each example's start offset (plus the total); None for text
    masks: dict[str, np.ndarray] | None = None
    starts: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.hf_tokenizer = as_transformers(self.hf_tokenizer if self.hf_tokenizer is not None else self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self.hf_tokenizer.eos_token_id

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer to ``directory`` (``save_pretrained``: ``AutoTokenizer`` loads it from there)."""
        save_pretrained_tokenizer(self.hf_tokenizer, directory)

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise RankwiseError(f"unknown split {name!r}; valid splits: train, val")
        return self.train if name == "train" else self.val

    def batches(self, name: str, batch_size: int, seq_len: int, seed: int = 0, pack: bool = True) -> "Batches":
        """``Batches`` of split ``name``, with the loss masks and example boundaries of instruction data."""
        return Batches(self.split(name), batch_size, seq_len, seed, mask=self.masks and self.masks[name],
                       starts=self.starts and self.starts[name], pack=pack)


def _encode(tok: Any, docs: list[str], dtype: np.dtype) -> np.ndarray:
    ids = [np.asarray(row, dtype=dtype) for row in encode_documents(tok, docs)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


def prepare(source: str = "stdlib-docs", vocab_size: int = 8192, val_fraction: float = 0.1,
            tokenizer: Any = None) -> TokenizedCorpus:
    """Build (or load from cache) the tokenized train/validation splits of ``source``.

    ``tokenizer`` (a transformers tokenizer, e.g. a model's ``AutoTokenizer``, or a ``tokenizers.Tokenizer`` holding
    ``<|endoftext|>``) tokenizes the text; ``vocab_size`` is then ignored. Without one, a BPE of ``vocab_size``
    tokens is trained on this corpus's training split: do that only when pre-training from scratch.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RankwiseError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer is None and not 256 < vocab_size <= 2**32:
        raise RankwiseError(f"vocab_size must be above 256 (the byte alphabet), got {vocab_size}")
    given = None if tokenizer is None else as_transformers(tokenizer)
    tok_key = f"own-v{vocab_size}" if given is None else tokenizer_id(given)
    stem = f"{FORMAT_VERSION}-{sources.fingerprint(source)}-f{val_fraction}"
    if instruct.detect_format(source):
        return _prepare_instruct(source, vocab_size, val_fraction, given, f"{stem}-i{tok_key}")
    directory = cache_root() / "corpora" / f"{stem}-t{tok_key}"
    if given is not None and not (directory / "meta.json").exists():
        directory = _own_corpus_with(stem, tok_key) or directory
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        docs = sources.documents(source)
        train_docs = [d for d in docs if not is_validation(d, val_fraction)]
        val_docs = [d for d in docs if is_validation(d, val_fraction)]
        if not train_docs or not val_docs:
            raise RankwiseError(f"data source {source!r} is too small to split into train and validation "
                                f"({len(docs)} document(s); a .txt file is split at blank lines, .jsonl has one "
                                "per line); give it more documents")
        tok = given or as_transformers(train_tokenizer(train_docs, vocab_size))
        vocab = tok.backend_tokenizer.get_vocab_size()
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        directory.mkdir(parents=True, exist_ok=True)
        save_pretrained_tokenizer(tok, directory / "tokenizer")
        for name, split_docs in (("train", train_docs), ("val", val_docs)):
            arr = _encode(tok, split_docs, dtype)
            write_atomic(directory / f"{name}.bin", lambda p, a=arr: a.tofile(p))
        meta = {"source": source, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": tok.eos_token_id,
                "tokenizer": tokenizer_id(tok), "documents": {"train": len(train_docs), "val": len(val_docs)}}
        write_atomic(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.memmap(directory / f"{name}.bin", dtype=meta["dtype"], mode="r") for name in ("train", "val")}
    tok = given or load_pretrained_tokenizer(str(directory / "tokenizer"))
    return TokenizedCorpus(source, tok.backend_tokenizer, arrays["train"], arrays["val"], directory, tok)


def _prepare_instruct(source: str, vocab_size: int, val_fraction: float, given: Any, key: str) -> TokenizedCorpus:
    """``prepare`` for instruction rows: token arrays plus ``.mask`` (loss mask) and ``.starts`` (example offsets)
    per split, split by a hash of each row; the chat template is part of the cache key."""
    template = getattr(given, "chat_template", None) or ""
    directory = cache_root() / "corpora" / f"{key}-c{hashlib.sha1(template.encode()).hexdigest()[:8]}"
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        kind, rows = instruct.read_examples(source)
        keyed = [(json.dumps(r, sort_keys=True), r) for r in rows]
        split_rows = {"train": [r for k, r in keyed if not is_validation(k, val_fraction)],
                      "val": [r for k, r in keyed if is_validation(k, val_fraction)]}
        if not split_rows["train"] or not split_rows["val"]:
            raise RankwiseError(f"instruction data {source!r} is too small to split into train and validation "
                                f"({len(rows)} row(s)); give it more rows")
        tok = given or as_transformers(train_tokenizer(
            [instruct.render(None, r)[0] for r in split_rows["train"]], vocab_size))
        vocab = tok.backend_tokenizer.get_vocab_size()
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        directory.mkdir(parents=True, exist_ok=True)
        save_pretrained_tokenizer(tok, directory / "tokenizer")
        for name, split in split_rows.items():
            ids, mask, starts = instruct.flatten(instruct.tokenize(tok, split), dtype)
            for suffix, arr in (("bin", ids), ("mask", mask), ("starts", starts)):
                write_atomic(directory / f"{name}.{suffix}", lambda p, a=arr: a.tofile(p))
        meta = {"source": source, "format": kind, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                "eos_id": tok.eos_token_id, "tokenizer": tokenizer_id(tok),
                "documents": {k: len(v) for k, v in split_rows.items()}}
        write_atomic(meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    meta = json.loads(meta_path.read_text())
    read = {(name, suffix): np.memmap(directory / f"{name}.{suffix}", mode="r",
                                      dtype={"bin": meta["dtype"], "mask": np.uint8, "starts": np.int64}[suffix])
            for name in ("train", "val") for suffix in ("bin", "mask", "starts")}
    tok = given or load_pretrained_tokenizer(str(directory / "tokenizer"))
    return TokenizedCorpus(source, tok.backend_tokenizer, read["train", "bin"], read["val", "bin"], directory, tok,
                           masks={n: read[n, "mask"] for n in ("train", "val")},
                           starts={n: read[n, "starts"] for n in ("train", "val")})


def _own_corpus_with(stem: str, tok_id: str) -> Path | None:
    """The cached corpus of this source whose own BPE is the tokenizer ``tok_id`` (a run trained on it being
    evaluated or resumed), so it is not tokenized twice."""
    for meta in sorted((cache_root() / "corpora").glob(f"{stem}-town-v*/meta.json")):
        if json.loads(meta.read_text()).get("tokenizer") == tok_id:
            return meta.parent
    return None


@dataclass
class LabeledBatch:
    """A batch of instruction data: ``ids`` (B, T+1) token ids and ``mask`` (B, T), True where the target
    ``ids[:, 1:]`` counts in the loss (completion tokens). Moves and splits like a tensor."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: Any) -> "LabeledBatch":
        return LabeledBatch(self.ids.to(device), self.mask.to(device))

    def chunk(self, n: int) -> list["LabeledBatch"]:
        return [LabeledBatch(i, m) for i, m in zip(self.ids.chunk(n), self.mask.chunk(n))]

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape


def target_count(batch: "torch.Tensor | LabeledBatch") -> int:
    """The number of tokens a batch's loss averages over."""
    return int(batch.mask.sum()) if isinstance(batch, LabeledBatch) else batch[:, 1:].numel()


class Batches:
    """Fixed-length windows of a token array.

    Training batch ``i`` is drawn with a generator seeded by ``(seed, i)``, so the data order is a pure function of
    the step: every method sees the same tokens, and a resumed run continues exactly where it stopped.
    Evaluation batches are the first non-overlapping windows of the split, the same for every run.

    With a loss ``mask`` (instruction data) batches are ``LabeledBatch``: packed (``pack=True``, windows over the
    concatenated examples, which may start or end inside one and attend across example boundaries, positions
    running on), or padded (``pack=False``: one example per row, from its start, cut at ``seq_len + 1`` tokens and
    right-padded with the end-of-text id, the padding never a target; a causal model needs no attention mask for
    right padding). Training draws windows (packed) or examples (padded) uniformly at random; evaluation takes them
    in order.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 mask: np.ndarray | None = None, starts: np.ndarray | None = None, pack: bool = True,
                 pad_id: int = 0):
        self.padded = mask is not None and not pack
        if self.padded and starts is None:
            raise RankwiseError("padded batches need the example offsets (starts) of the instruction data")
        if not self.padded and len(tokens) < seq_len + 2:
            raise RankwiseError(f"the split holds {len(tokens)} tokens, fewer than one window of seq_len={seq_len}; "
                                "use a shorter --seq-len or more data")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.mask, self.starts = mask, starts
        self.pad_id = int(tokens[starts[1] - 1]) if self.padded else pad_id  # the end-of-text id ends each example

    def _windows(self, starts: torch.Tensor) -> "torch.Tensor | LabeledBatch":
        idx = starts.numpy()[:, None] + np.arange(self.seq_len + 1)
        ids = torch.from_numpy(self.tokens[idx].astype(np.int64))
        if self.mask is None:
            return ids
        return LabeledBatch(ids, torch.from_numpy(self.mask[idx[:, 1:]].astype(bool)))

    def _examples(self, which: np.ndarray) -> LabeledBatch:
        n = self.seq_len + 1
        ids = np.full((len(which), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(which), n), dtype=bool)
        for row, k in enumerate(which):
            a, b = int(self.starts[k]), int(min(self.starts[k + 1], self.starts[k] + n))
            ids[row, :b - a] = self.tokens[a:b]
            mask[row, :b - a] = self.mask[a:b]
        return LabeledBatch(torch.from_numpy(ids), torch.from_numpy(mask[:, 1:]))

    def train_batch(self, i: int) -> "torch.Tensor | LabeledBatch":
        """Batch ``i``: (batch_size, seq_len + 1) token ids (inputs are [:, :-1], targets [:, 1:])."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.padded:
            return self._examples(torch.randint(0, len(self.starts) - 1, (self.batch_size,), generator=g).numpy())
        return self._windows(torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g))

    def eval_batches(self, n: int) -> list["torch.Tensor | LabeledBatch"]:
        """Up to ``n`` batches of consecutive, non-overlapping windows (padded: examples) from the split's start."""
        if self.padded:
            count = min(n * self.batch_size, len(self.starts) - 1)
            return [self._examples(np.arange(k, min(k + self.batch_size, count)))
                    for k in range(0, count, self.batch_size)]
        count = min(n * self.batch_size, (len(self.tokens) - 1) // self.seq_len)
        starts = torch.arange(count) * self.seq_len
        return [self._windows(starts[k:k + self.batch_size]) for k in range(0, count, self.batch_size)]
