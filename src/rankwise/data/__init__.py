"""Data: offline corpora, a cached byte-level BPE tokenizer, memory-mapped token arrays and deterministic batches."""

from .dataset import Batches, TokenizedCorpus, cache_root, prepare
from .sources import BUILTIN_SOURCES, documents

__all__ = ["BUILTIN_SOURCES", "Batches", "TokenizedCorpus", "cache_root", "documents", "prepare"]
