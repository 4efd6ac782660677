"""Multi-task data (synthetic tasks, shared tokenizer, disjoint splits, exact match) and the bench suite smoke run."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from rankwise.data.dataset import is_validation
from rankwise.data.multitask import (SEPARATOR, SYNTHETIC, encode_examples, exact_match, prepare_multitask,
                                     synthetic_file)
from rankwise.errors import RankwiseError


def _solve(task, prompt):
    args = prompt.split()[1:]
    if task == "add":
        return f" {int(args[0]) + int(args[2])}"
    if task in ("reverse", "sort"):
        return " " + " ".join(reversed(args) if task == "reverse" else sorted(args))
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in args:
        if c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return " no"
        else:
            stack.append(c)
    return " no" if stack else " yes"


@pytest.mark.parametrize("task", sorted(SYNTHETIC))
def test_synthetic_examples_are_correct_and_deterministic(rankwise_cache, task):
    rng = random.Random(1)
    examples = [SYNTHETIC[task](rng) for _ in range(300)]
    assert all(answer == _solve(task, prompt) for prompt, answer in examples)
    if task == "brackets":  # both labels are common
        assert 0.3 < sum(a == " yes" for _, a in examples) / 300 < 0.7
    path = synthetic_file(task, 50, seed=3)
    text = path.read_text()
    path.unlink()
    assert synthetic_file(task, 50, seed=3).read_text() == text
    assert len(set(text.splitlines())) == 50
    assert synthetic_file(task, 50, seed=4).read_text() != text


def test_prepare_multitask_shares_tokenizer_and_splits(corpus):
    data = prepare_multitask(("prose", "add", "sort"), examples=200, tokens_per_task=2000)
    assert set(data.tasks) == {"prose", "add", "sort"}
    assert all(t.corpus.tokenizer.to_str() == corpus.tokenizer.to_str() for t in data.tasks.values())
    for name in ("add", "sort"):
        val = data.tasks[name].val_examples
        assert val and all(is_validation(p.removesuffix(SEPARATOR) + SEPARATOR + a, 0.1) for p, a in val)
    assert len(data.mixture.train) == sum(min(2000, len(t.corpus.train)) for t in data.tasks.values())
    with pytest.raises(RankwiseError, match="unknown task"):
        prepare_multitask(("poetry",))


class _Oracle(torch.nn.Module):
    """Predicts the next token of the known sequences, except where ``wrong`` says."""

    def __init__(self, ids, vocab, wrong=None):
        super().__init__()
        self.ids, self.vocab, self.wrong = ids, vocab, wrong or []

    def forward(self, input_ids):
        rows = [next(i for i in range(len(self.ids)) if torch.equal(self.ids[i, :-1], r)) for r in input_ids]
        nxt = self.ids[rows, 1:].clone()
        for row, pos in self.wrong:
            if row in rows:
                nxt[rows.index(row), pos] = (nxt[rows.index(row), pos] + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_exact_match_counts_only_answer_tokens(corpus):
    tok = corpus.tokenizer
    examples = [("add 1 + 2 =", " 3"), ("sort 3 1 2 =", " 1 2 3"), ("reverse a b =", " b a")]
    ids, mask = encode_examples(tok, examples)
    vocab = tok.get_vocab_size()
    assert exact_match(_Oracle(ids, vocab), tok, examples, batch_size=2) == 1.0
    answer_pos = int(mask[1].nonzero()[0]) - 1  # predicting the first answer token of example 1
    assert exact_match(_Oracle(ids, vocab, [(1, answer_pos)]), tok, examples) == pytest.approx(2 / 3)
    assert exact_match(_Oracle(ids, vocab, [(1, 0)]), tok, examples) == 1.0  # a prompt token: not scored
    stop_pos = int(mask[2].nonzero()[-1]) - 1  # the end-of-text after the answer is scored too
    assert exact_match(_Oracle(ids, vocab, [(2, stop_pos)]), tok, examples) == pytest.approx(2 / 3)


def test_multitask_suite_smoke(corpus, tmp_path):
    from rankwise.bench.multitask import run_multitask_suite, smoke_config

    rows = run_multitask_suite(smoke_config(methods=("lora", "smora")), tmp_path)
    assert [r["method"] for r in rows] == ["base", "lora", "smora"]
    for r in rows:
        assert set(r["tasks"]) == {"prose", "add"}
        assert 0.0 <= r["avg_accuracy"] <= 1.0 and r["avg_loss"] > 0
    lora, smora = rows[1], rows[2]
    assert lora["activated_params"] == lora["trainable_params"]
    assert smora["activated_params"] < smora["trainable_params"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["base", "lora", "smora"]
    for name in ("results.md", "multitask.png", "routing_smora.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_cli_multitask_suite_rejects_unknown_methods(capsys):
    from rankwise.cli.main import main

    assert main(["bench", "--suite", "multitask", "--methods", "lora,poetry"]) == 2
    assert "unknown method(s) poetry" in capsys.readouterr().err
