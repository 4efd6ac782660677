import json

import numpy as np
import pytest

from rankwise.data import Batches, prepare
from rankwise.data.dataset import is_validation
from rankwise.data.sources import documents, local_documents
from rankwise.errors import RankwiseError


def test_corpus_is_real_text_split_deterministically(corpus):
    docs = documents("stdlib-docs")
    assert sum(map(len, docs)) > 1_000_000  # ~1.5 MB of prose
    val = [d for d in docs if is_validation(d, 0.1)]
    assert 0.05 < len(val) / len(docs) < 0.15
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    assert len(corpus.train) > 300_000 and len(corpus.val) > 10_000
    # the cached arrays hold exactly the encoding of the split, separated by end-of-text
    again = prepare()
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    first = corpus.tokenizer.decode(corpus.val[: int(np.argmax(corpus.val == corpus.eos_id))].tolist())
    assert first == val[0]


def test_tokenizer_round_trips_any_text(corpus):
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ \t"
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text).ids) == text
    assert corpus.vocab_size == 8192


def test_batches_are_a_pure_function_of_the_index(corpus):
    b = Batches(corpus.train, 4, 32, seed=1)
    assert b.train_batch(7).shape == (4, 33)
    assert b.train_batch(7).equal(Batches(corpus.train, 4, 32, seed=1).train_batch(7))
    assert not b.train_batch(7).equal(b.train_batch(8))
    assert not b.train_batch(7).equal(Batches(corpus.train, 4, 32, seed=2).train_batch(7))
    evals = Batches(corpus.val, 4, 32).eval_batches(3)
    assert len(evals) == 3 and evals[0][0, :32].tolist() == corpus.val[:32].tolist()


def test_local_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert local_documents(tmp_path / "b.jsonl") == ["first doc", "second"]
    assert local_documents(tmp_path) == ["hello world " * 50, "first doc", "second"]


@pytest.mark.parametrize("content, message", [
    ("not json\n", "not valid JSON"),
    ('{"txt": "x"}\n', 'string "text" field'),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RankwiseError, match=message):
        local_documents(path)


def test_missing_empty_and_tiny_sources(tmp_path):
    with pytest.raises(RankwiseError, match="does not exist"):
        documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(RankwiseError, match="holds no text"):
        documents(str(tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(RankwiseError, match="too small"):
        prepare(str(tmp_path / "one.txt"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(RankwiseError, match="no .txt or .jsonl"):
        documents(str(tmp_path / "sub"))


def test_txt_is_split_into_paragraphs_and_chunks(tmp_path):
    from rankwise.data.sources import MAX_DOC_CHARS, split_text

    text = "first paragraph\nstill first\n\n\n  second, indented\n \t\nthird\r\n\r\nfourth"
    assert split_text(text) == ["first paragraph\nstill first", "  second, indented", "third", "fourth"]
    # a long paragraph is cut at line breaks (else spaces, else the limit); no text is lost but the cut character
    lines = [f"    line {i} " + "x" * (i % 30) for i in range(40)]
    chunks = split_text("\n".join(lines), max_chars=200)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 1
    assert "\n".join(chunks) == "\n".join(lines)
    assert split_text("a" * 25, max_chars=10) == ["a" * 10, "a" * 10, "a" * 5]
    assert split_text("ab cd ef", max_chars=5) == ["ab cd", "ef"]
    # a single 300 KB .txt file (one paragraph per ~500 characters) now splits into train and validation
    (tmp_path / "book.txt").write_text("\n\n".join(f"paragraph {i}: " + "lorem ipsum dolor " * 28 for i in range(600)))
    docs = local_documents(tmp_path / "book.txt")
    assert len(docs) == 600 and all(len(d) <= MAX_DOC_CHARS for d in docs)
    corpus = prepare(str(tmp_path / "book.txt"), 512)
    assert len(corpus.train) > 0 and len(corpus.val) > 0


@pytest.mark.parametrize("name, content, offset", [
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), 3),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "bad \xff"}\n', 29),
    ("bom.txt", b"\xef\xbb\xbfgood\n\nthen \xc3(", 14),
])
def test_non_utf8_names_the_file_and_byte_offset(tmp_path, name, content, offset):
    path = tmp_path / name
    path.write_bytes(content)
    assert content[offset] >= 0x80
    with pytest.raises(RankwiseError, match=rf"{name}: byte offset {offset} \(line \d+\) is not UTF-8"):
        local_documents(path)


def test_utf8_bom_is_allowed(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n\nwörld".encode("utf-8"))
    assert local_documents(tmp_path / "bom.txt") == ["hello", "wörld"]
