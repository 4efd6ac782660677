"""An offline multi-task setup: several text domains and synthetic tasks sharing one tokenizer, each with its own
validation split and metric, plus a training mixture of all of them.

Tasks (``TASKS``):

- ``prose``: docstrings of the Python standard library (``stdlib-docs``); metric: validation loss.
- ``code``: the standard library's Python sources (``stdlib-code``); metric: validation loss.
- ``add``: ``add 482 + 37 = 519`` (operands in [0, 999]); metric: exact-match accuracy of the answer.
- ``reverse``: ``reverse k q x m = m x q k`` (3-6 letters); exact match.
- ``sort``: ``sort 7 2 9 4 = 2 4 7 9`` (3-6 digits); exact match.
- ``brackets``: ``balanced ( [ ] ) = yes`` (2-8 brackets, half of them balanced by construction); exact match.

The synthetic tasks are generated deterministically (``random.Random(seed)``), one example per line, into
``cache_root()/multitask/*.jsonl`` and go through ``rankwise.data.prepare`` like any corpus: the train/validation
split is by a hash of each example, so no validation example is ever trained on. Every corpus uses the tokenizer of
``prepare("stdlib-docs")``. Exact match is computed with teacher forcing: the answer (and the end-of-text token that
follows it) is correct iff every answer token is the model's argmax, which is exactly when greedy decoding would
write the answer and stop.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from ..errors import RankwiseError
from .dataset import TokenizedCorpus, cache_root, is_validation, prepare

SEPARATOR = " ="
VAL_FRACTION = 0.1


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"add {a} + {b}", f" {a + b}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))]
    return "reverse " + " ".join(letters), " " + " ".join(reversed(letters))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
    return "sort " + " ".join(digits), " " + " ".join(sorted(digits))


def _brackets(rng: random.Random) -> tuple[str, str]:
    pairs = {"(": ")", "[": "]", "{": "}"}
    n = rng.randint(1, 4)
    if rng.random() < 0.5:  # a random balanced sequence
        seq, stack = [], []
        while len(seq) + len(stack) < 2 * n or stack:
            if stack and (len(seq) + len(stack) >= 2 * n or rng.random() < 0.5):
                seq.append(pairs[stack.pop()])
            else:
                stack.append(rng.choice(list(pairs)))
                seq.append(stack[-1])
    else:  # a random sequence (almost always unbalanced)
        seq = [rng.choice("()[]{}") for _ in range(2 * n)]
    return "balanced " + " ".join(seq), " yes" if _is_balanced(seq) else " no"


def _is_balanced(seq: list[str]) -> bool:
    closing, stack = {")": "(", "]": "[", "}": "{"}, []
    for c in seq:
        if c in closing:
            if not stack or stack.pop() != closing[c]:
                return False
        else:
            stack.append(c)
    return not stack


SYNTHETIC: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "brackets": _brackets}
TEXT = {"prose": "stdlib-docs", "code": "stdlib-code"}
TASKS = (*TEXT, *SYNTHETIC)


def synthetic_file(task: str, examples: int, seed: int) -> Path:
    """The ``.jsonl`` file of ``examples`` distinct examples of ``task`` (written once, atomically)."""
    if task not in SYNTHETIC:
        raise RankwiseError(f"unknown synthetic task {task!r}; valid: {', '.join(SYNTHETIC)}")
    path = cache_root() / "multitask" / f"{task}-n{examples}-s{seed}.jsonl"
    if path.exists():
        return path
    rng, seen, lines = random.Random(f"{task}-{seed}"), set(), []
    for _ in range(50 * examples):
        prompt, answer = SYNTHETIC[task](rng)
        text = prompt + SEPARATOR + answer
        if text not in seen:
            seen.add(text)
            lines.append(json.dumps({"text": text}))
        if len(lines) == examples:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Task:
    """One task: its tokenized corpus and, for synthetic tasks, its validation (prompt, answer) pairs."""

    name: str
    corpus: TokenizedCorpus
    val_examples: list[tuple[str, str]] | None = None


@dataclass
class MultiTaskData:
    tokenizer: Tokenizer
    tasks: dict[str, Task]
    mixture: TokenizedCorpus  # the training mixture (equal token budget per task) and the concatenated validation


def prepare_multitask(tasks: tuple[str, ...] = TASKS, vocab_size: int = 8192, examples: int = 4000, seed: int = 0,
                      tokens_per_task: int = 100_000) -> MultiTaskData:
    """Build (or load from cache) every task's corpus with one shared tokenizer, and the training mixture: the
    first ``tokens_per_task`` training tokens of each task, concatenated (windows are drawn uniformly from it)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise RankwiseError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(TASKS)}")
    if examples < 20 or tokens_per_task < 1000:
        raise RankwiseError(f"examples must be >= 20 and tokens_per_task >= 1000, got {examples}, {tokens_per_task}")
    tok = prepare("stdlib-docs", vocab_size).tokenizer
    out: dict[str, Task] = {}
    for name in tasks:
        if name in TEXT:
            out[name] = Task(name, prepare(TEXT[name], vocab_size, VAL_FRACTION, tokenizer=tok))
            continue
        path = synthetic_file(name, examples, seed)
        docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        val = [tuple(d.split(SEPARATOR, 1)) for d in docs if is_validation(d, VAL_FRACTION)]
        val = [(p + SEPARATOR, a) for p, a in val]
        out[name] = Task(name, prepare(str(path), vocab_size, VAL_FRACTION, tokenizer=tok), val)
    train = np.concatenate([t.corpus.train[:tokens_per_task] for t in out.values()])
    val = np.concatenate([t.corpus.val for t in out.values()])
    first = next(iter(out.values())).corpus
    mixture = TokenizedCorpus("multitask:" + ",".join(tasks), tok, train, val, first.directory)
    return MultiTaskData(tok, out, mixture)


def encode_examples(tokenizer: Tokenizer, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N x L, padded with end-of-text) of ``prompt + answer + <eos>`` and a mask (N x L) of the answer
    tokens and the final end-of-text: the positions whose prediction the exact match checks."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows, masks = [], []
    for prompt, answer in examples:
        enc = tokenizer.encode(prompt + answer)
        first = next(i for i, (_, end) in enumerate(enc.offsets) if end > len(prompt))
        ids = enc.ids + [eos]
        rows.append(ids)
        masks.append([i >= max(first, 1) for i in range(len(ids))])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return ids, mask


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Tokenizer, examples: list[tuple[str, str]], batch_size: int = 64,
                device: torch.device | str = "cpu") -> float:
    """Fraction of ``examples`` whose answer (and stop token) greedy decoding reproduces exactly."""
    if not examples:
        raise RankwiseError("exact_match needs at least one example")
    was_training = model.training
    model.eval()
    ids, mask = encode_examples(tokenizer, examples)
    correct = 0
    for k in range(0, len(ids), batch_size):
        x, m = ids[k:k + batch_size].to(device), mask[k:k + batch_size].to(device)
        pred = model(input_ids=x[:, :-1]).logits.argmax(-1)
        ok = (pred == x[:, 1:]) | ~m[:, 1:]
        correct += int(ok.all(-1).sum())
    model.train(was_training)
    return correct / len(examples)
