"""Data: offline corpora, a cached byte-level BPE tokenizer, memory-mapped token arrays and deterministic batches."""

from .dataset import Batches, LabeledBatch, TokenizedCorpus, cache_root, prepare, target_count
from .sources import BUILTIN_SOURCES, documents

__all__ = ["BUILTIN_SOURCES", "Batches", "LabeledBatch", "target_count", "TokenizedCorpus", "cache_root", "documents", "prepare"]
