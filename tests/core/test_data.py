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
