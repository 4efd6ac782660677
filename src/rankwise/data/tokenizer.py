"""Tokenizers: a byte-level BPE trained on the training split (pre-training from scratch), or a model's own.

Every tokenizer is handled as a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``): the BPE trained here
is wrapped in one (end-of-text ``<|endoftext|>``), a model folder's or hub model's comes from ``AutoTokenizer``. A
run saves its tokenizer in its folder with ``save_pretrained``, so ``AutoTokenizer.from_pretrained(OUT)`` loads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import RankwiseError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
# Files by which a folder holds a transformers tokenizer (fast, or a slow one transformers converts).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def train_tokenizer(docs: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the alphabet, so no text is ever out of vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def as_transformers(tok: "Tokenizer | PreTrainedTokenizerBase") -> "PreTrainedTokenizerBase":
    """``tok`` as a transformers fast tokenizer; a bare ``tokenizers.Tokenizer`` must hold ``<|endoftext|>``."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tok, PreTrainedTokenizerBase):
        if getattr(tok, "backend_tokenizer", None) is None:
            raise RankwiseError(f"tokenizer {type(tok).__name__} is not a fast (tokenizers) tokenizer; load it with "
                                "AutoTokenizer.from_pretrained(..., use_fast=True)")
        if tok.eos_token_id is None:
            raise RankwiseError(f"tokenizer {tok.name_or_path or type(tok).__name__!r} has no end-of-text token "
                                "(eos_token), which separates documents; set tokenizer.eos_token")
        return tok
    if tok.token_to_id(EOS) is None:
        raise RankwiseError(f"the tokenizer has no {EOS} token, which separates documents; train it with "
                            f"rankwise.data.tokenizer.train_tokenizer or pass a transformers tokenizer")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def tokenizer_id(tok: "PreTrainedTokenizerBase") -> str:
    """Identity of a tokenizer for cache keys: its full serialization (vocabulary, merges, normalizer,
    pre-tokenizer, special-token template) and its end-of-text id."""
    text = tok.backend_tokenizer.to_str() + f"|eos={tok.eos_token_id}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def encode_documents(tok: "PreTrainedTokenizerBase", docs: list[str]) -> list[list[int]]:
    """The token ids of each document: ``tok(doc).input_ids`` (with the tokenizer's own special tokens, e.g. a
    BOS), followed by the end-of-text id unless the tokenizer already ends the document with it."""
    if not docs:
        return []
    eos = tok.eos_token_id
    ids = tok(docs, add_special_tokens=True, verbose=False)["input_ids"]
    return [row if row and row[-1] == eos else row + [eos] for row in ids]


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def load_pretrained_tokenizer(name_or_dir: str) -> "PreTrainedTokenizerBase":
    """``AutoTokenizer.from_pretrained`` of a folder or hub name, with one clear error when it cannot load."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:  # OSError offline / missing files, ValueError for unknown classes, ...
        where = "folder" if os.path.isdir(name_or_dir) else "Hugging Face hub model"
        raise RankwiseError(f"could not load the tokenizer of {where} {name_or_dir!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); check the name and your "
                            "internet connection, or pass a local folder saved with save_pretrained") from None
    return as_transformers(tok)


def save_pretrained_tokenizer(tok: "PreTrainedTokenizerBase", directory: str | os.PathLike) -> None:
    """``tok.save_pretrained(directory)``, each file written to a temp folder first and renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tokenizer."))
    try:
        tok.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
