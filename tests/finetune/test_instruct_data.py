"""Instruction data (``rankwise.data.instruct``): prompt-masked loss, chat templates, packed / padded batches, bad
rows, and a fine-tune of a saved model on instruction data."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import WORDS, model_folder, quick_run, small_model

from rankwise.data import LabeledBatch, prepare
from rankwise.data.tokenizer import load_pretrained_tokenizer
from rankwise.errors import RankwiseError
from rankwise.train import lm_loss

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_rows(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def word_task(n: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """``copy w1 w2 w3 =`` -> `` w3 w2 w1``: learnable from the completion tokens only."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = [rng.choice(WORDS) for _ in range(3)]
        rows.append({"prompt": "reverse " + " ".join(w) + " =", "completion": " " + " ".join(reversed(w))})
    return rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return model_folder(tmp_path_factory.mktemp("instruct-model"))


def test_masked_prompt_loss_equals_the_loss_over_completion_tokens_only(folder, tmp_path):
    tok = load_pretrained_tokenizer(folder)
    rows = word_task(40)
    corpus = prepare(write_rows(tmp_path / "pc.jsonl", rows), tokenizer=tok)
    batch = corpus.batches("val", 4, 64, pack=False).eval_batches(1)[0]
    assert isinstance(batch, LabeledBatch)
    model = small_model(3)
    # the oracle: prompt tokens are a prefix of the full row's tokens (the prompt ends before a space), the
    # completion's tokens and the end-of-text id follow; hand CE over exactly those targets
    total, count = 0.0, 0
    logits = model(input_ids=batch.ids[:, :-1]).logits.float().log_softmax(-1)
    for row in range(batch.ids.shape[0]):
        ids = batch.ids[row].tolist()
        text = tok.decode([i for i in ids if i != tok.eos_token_id])
        prompt = text[:text.index("=") + 1]
        p_ids = tok(prompt)["input_ids"]
        full = tok(text)["input_ids"] + [tok.eos_token_id]
        assert ids[:len(full)] == full and full[:len(p_ids)] == p_ids
        for pos in range(len(p_ids), len(full)):  # targets ids[pos] predicted at pos - 1
            total -= logits[row, pos - 1, full[pos]].item()
            count += 1
    assert batch.mask.sum().item() == count
    assert lm_loss(model, batch).item() == pytest.approx(total / count, rel=1e-5)
    # unmasked (every target) differs: the mask matters
    assert abs(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.ids[:, 1:].reshape(-1),
                               reduction="mean").item() - total / count) > 1e-3


def test_packed_batches_carry_the_mask_of_their_tokens(folder, tmp_path):
    tok = load_pretrained_tokenizer(folder)
    corpus = prepare(write_rows(tmp_path / "pc.jsonl", word_task(60, seed=1)), tokenizer=tok)
    b = corpus.batches("train", 3, 20, seed=5).train_batch(2)
    mask = torch.from_numpy(corpus.masks["train"].astype(bool))
    ids = torch.from_numpy(corpus.train.astype("int64"))
    for row in range(3):  # locate each window in the flat arrays: its mask is the flat mask shifted by one
        start = next(s for s in range(len(ids) - 20) if torch.equal(ids[s:s + 21], b.ids[row]))
        assert torch.equal(b.mask[row], mask[start + 1:start + 21])
    padded = corpus.batches("train", 3, 40, pack=False).train_batch(0)
    for row in range(3):  # one example from its start: its end-of-text is the last target, the padding none
        end = padded.ids[row].tolist().index(tok.eos_token_id)
        assert padded.mask[row, end - 1] and not padded.mask[row, end:].any()
        assert (padded.ids[row, end:] == tok.eos_token_id).all()


def test_chat_rows_render_with_the_tokenizer_chat_template(folder, tmp_path):
    tok = load_pretrained_tokenizer(folder)
    tok.chat_template = TEMPLATE
    def conv(i: int) -> list[dict[str, str]]:
        return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"alpha beta {i}"},
                {"role": "assistant", "content": " gamma"}, {"role": "user", "content": "delta"},
                {"role": "assistant", "content": " rank layer"}]
    rows = [{"messages": conv(i)} for i in range(30)] + [{"messages": conv(i)[:3]} for i in range(30, 60)]
    corpus = prepare(write_rows(tmp_path / "chat.jsonl", rows), tokenizer=tok)
    assert corpus.starts is not None
    ids = corpus.train[corpus.starts["train"][0]:corpus.starts["train"][1]].tolist()
    mask = corpus.masks["train"][corpus.starts["train"][0]:corpus.starts["train"][1]].tolist()
    text = tok.decode(ids)
    assert text.startswith("<|system|>be brief<|end|><|user|>")  # the template's rendering, not role: lines
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.replace(tok.eos_token, "") in (" gamma<|end|> rank layer<|end|>", " gamma<|end|>")
    assert not any(m for i, m in zip(ids, mask) if tok.decode([i]) in ("alpha", "be", "delta"))


def test_chat_rows_without_a_template_train_only_the_assistant_lines(folder, tmp_path):
    tok = load_pretrained_tokenizer(folder)
    rows = [{"messages": [{"role": "user", "content": f"alpha {i}"}, {"role": "assistant", "content": "gamma delta"}]}
            for i in range(40)]
    corpus = prepare(write_rows(tmp_path / "chat.jsonl", rows), tokenizer=tok)
    ids = corpus.train[:corpus.starts["train"][1]].tolist()
    mask = corpus.masks["train"][:corpus.starts["train"][1]].tolist()
    assert re.fullmatch(r"user: alpha \d+\nassistant: gamma delta\n<\|endoftext\|>", tok.decode(ids))
    assert tok.decode([i for i, m in zip(ids, mask) if m]).replace(tok.eos_token, "").strip() == "gamma delta"


@pytest.mark.parametrize("pack", [True, False])
def test_lora_fine_tune_on_instruction_data_lowers_validation_loss(folder, tmp_path, pack):
    data = write_rows(tmp_path / "task.jsonl", word_task(300))
    m = quick_run(tmp_path / "run", folder, data, model=folder, steps=30, seq_len=48, batch_size=8, lr=1e-2, pack=pack,
                  eval_batches=4).metrics
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.3, m
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"pc.jsonl:2: missing or non-string 'completion'"),
    ([{"prompt": "a", "completion": "b"}, {"messages": []}], r"pc.jsonl:2: expected a prompt-completion row"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
     r"pc.jsonl:1: message 1 has role 'bot'; valid roles"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"pc.jsonl:1: no assistant message"),
    ([{"messages": [{"role": "user"}]}], r"pc.jsonl:1: message 0 needs a 'role' and a string 'content'"),
    ([{"prompt": "a", "completion": "b"}, "{not json"], r"pc.jsonl:2: not valid JSON"),
])
def test_bad_instruction_rows_name_the_line(folder, tmp_path, rows, message):
    with pytest.raises(RankwiseError, match=message):
        prepare(write_rows(tmp_path / "pc.jsonl", rows), tokenizer=load_pretrained_tokenizer(folder))


@pytest.mark.parametrize("method, options, quantize", [
    ("dora", {"r": 4, "alpha": 8, "target": "all-linear"}, None),
    ("adalora", {"r": 6, "target_r": 3, "tinit": 5, "tfinal": 10, "target": "all-linear"}, None),
    ("lora", {"r": 4, "alpha": 8, "target": "all-linear"}, "nf4"),
])
def test_dora_adalora_and_qlora_on_instruction_data_lower_validation_loss(folder, tmp_path, method, options,
                                                                         quantize):
    if quantize:
        pytest.importorskip("torchao")
    data = write_rows(tmp_path / "task.jsonl", word_task(300))
    m = quick_run(tmp_path / "run", folder, data, model=folder, steps=30, seq_len=48, batch_size=8, lr=2e-2,
                  method=method, method_options=options, quantize=quantize, eval_batches=4).metrics
    drop = 0.15 if method == "adalora" else 0.3  # AdaLoRA starts from E = 0 and prunes (measured -0.28)
    assert m["final_eval_loss"] < m["initial_eval_loss"] - drop, m
