"""A model is always paired with its own tokenizer: a run saves its tokenizer, ``eval --data`` / ``--resume`` /
``--model RUN`` / ``--model HF_FOLDER`` tokenize with it, and only pre-training from scratch trains a new BPE."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from rankwise_testing import quick_config

from rankwise.cli.main import main
from rankwise.data import prepare
from rankwise.data.dataset import is_validation
from rankwise.data.sources import documents
from rankwise.data.tokenizer import as_transformers, train_tokenizer
from rankwise.errors import RankwiseError
from rankwise.models import load_pretrained, model_tokenizer
from rankwise.train import read_train_config, run_tokenizer, train

WORDS = "river stone lantern orbit velvet copper meadow signal harbor thistle quartz ember".split()


def held_out_file(path, n=300, seed=0):
    """A .jsonl of ``n`` short documents unlike the stdlib docstrings the runs are trained on."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + f" #{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def score_by_hand(model, tokenizer, data, seq_len, batch_size, eval_batches):
    """Mean next-token loss of ``model`` on the validation documents of ``data`` (the documented hash split),
    each encoded as ``tokenizer(doc).input_ids + [eos]``, in consecutive windows of ``seq_len + 1`` tokens."""
    docs = [d for d in documents(str(data)) if is_validation(d, 0.1)]
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    count = min(eval_batches * batch_size, (len(ids) - 1) // seq_len)
    windows = torch.tensor([ids[k * seq_len:k * seq_len + seq_len + 1] for k in range(count)])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), windows[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    res = train(quick_config(steps=4, seq_len=32, eval_batches=2, out=str(out)), corpus=corpus)
    return out, res


def test_run_saves_its_tokenizer_for_autotokenizer_and_its_config_as_train_config(run, corpus):
    from transformers import AutoTokenizer

    out, _ = run
    assert (out / "train_config.json").exists() and not (out / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x ** 2  # ünïcödé"
    assert tok(text)["input_ids"] == corpus.tokenizer.encode(text).ids
    assert tok.eos_token_id == corpus.eos_id
    assert read_train_config(out).seq_len == 32


def test_eval_data_scores_with_the_models_tokenizer(run, tmp_path, capsys):
    from transformers import AutoTokenizer

    out, res = run
    data = held_out_file(tmp_path / "mine.jsonl")
    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(out)
    expected = score_by_hand(res.model, tok, data, 32, 8, 2)
    assert result["eval_loss"] == pytest.approx(expected, abs=1e-5)
    # a BPE trained on the file (what eval did before) tokenizes it differently, so the test can fail
    own = prepare(str(data), 8192)
    assert own.val[:50].tolist() != prepare(str(data), tokenizer=tok).val[:50].tolist()


def test_old_run_without_saved_tokenizer_uses_the_bpe_it_was_trained_with(run, corpus, tmp_path):
    import shutil

    out, _ = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (old / f).unlink()
    (old / "train_config.json").rename(old / "config.json")  # the name runs had before
    assert read_train_config(old).seq_len == 32
    assert run_tokenizer(old).backend_tokenizer.to_str() == corpus.hf_tokenizer.backend_tokenizer.to_str()


def test_model_run_dir_starts_from_the_runs_weights_with_adapters_merged(corpus, tmp_path):
    base = tmp_path / "lora"
    first = train(quick_config(method="lora", steps=4, seq_len=32, eval_batches=2, lr=2e-2, out=str(base)),
                  corpus=corpus)
    assert any(p.abs().sum() > 0 for n, p in first.model.named_parameters() if "lora_B" in n)  # adapters moved
    second = train(quick_config(model=str(base), steps=1, seq_len=32, eval_batches=2), corpus=corpus)
    assert second.metrics["initial_eval_loss"] == pytest.approx(first.metrics["final_eval_loss"], abs=1e-5)
    assert not any("lora" in n for n, _ in second.model.named_parameters())
    # compress exports the merged function with the run's tokenizer, and the folder is a model spec again
    comp = tmp_path / "comp"
    assert main(["compress", "--model", str(base), "--ratio", "0", "--eval-batches", "0", "--out", str(comp)]) == 0
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():  # ratio 0 keeps every rank: the same function as the adapted run
        assert torch.allclose(load_pretrained(str(comp))(x).logits, first.model(x).logits, atol=1e-4)
    assert model_tokenizer(str(comp)).backend_tokenizer.to_str() == corpus.hf_tokenizer.backend_tokenizer.to_str()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small pretrained-style folder: a LLaMA with its own 400-token BPE (trained on other text), both saved
    with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "model"
    rng = random.Random(1)
    tok = as_transformers(train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)], 400))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_finetuning_an_hf_folder_tokenizes_with_its_autotokenizer(hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = held_out_file(tmp_path / "ft.jsonl", seed=2)
    out = tmp_path / "ft"
    res = train(quick_config(model=str(hf_folder), method="lora", data=str(data), steps=2, seq_len=32,
                             eval_batches=2, out=str(out)))
    auto = AutoTokenizer.from_pretrained(hf_folder)
    # token ids of the cached corpus are AutoTokenizer's, document by document
    corpus = prepare(str(data), tokenizer=model_tokenizer(str(hf_folder)))
    val_docs = [d for d in documents(str(data)) if is_validation(d, 0.1)]
    assert corpus.val.tolist() == [t for d in val_docs for t in auto(d)["input_ids"] + [auto.eos_token_id]]
    # LoRA starts at B = 0: the first evaluation is the base model scored with its own tokenizer
    base = AutoModelForCausalLM.from_pretrained(hf_folder)
    expected = score_by_hand(base, auto, data, 32, 8, 2)
    assert res.metrics["initial_eval_loss"] == pytest.approx(expected, abs=1e-5)
    # the run keeps the model's tokenizer
    assert AutoTokenizer.from_pretrained(out)("river stone")["input_ids"] == auto("river stone")["input_ids"]


def test_cache_key_includes_the_tokenizer(hf_folder, corpus, tmp_path):
    data = str(held_out_file(tmp_path / "k.jsonl", seed=3))
    own = prepare(data, 8192)
    dirs = {own.directory, prepare(data, 4096).directory, prepare(data, tokenizer=corpus.tokenizer).directory,
            prepare(data, tokenizer=model_tokenizer(str(hf_folder))).directory}
    assert len(dirs) == 4
    # the corpus tokenized with its own BPE is found again by that tokenizer (eval / resume of a run trained on it)
    # (on this 12-word text the 4096- and 8192-token BPEs are the same tokenizer: either cache serves)
    found = prepare(data, tokenizer=own.hf_tokenizer)
    assert "-town-v" in found.directory.name and found.val.tolist() == own.val.tolist()


def test_model_errors_are_one_clear_message(hf_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the network
    with pytest.raises(RankwiseError, match="from the Hugging Face hub"):
        load_pretrained("rankwise-no-such-org/no-such-model")
    with pytest.raises(RankwiseError, match="for a random init use --preset tiny"):
        load_pretrained("tiny")
    bare = tmp_path / "bare"
    AutoModel = __import__("transformers").AutoModelForCausalLM
    AutoModel.from_pretrained(hf_folder).save_pretrained(bare)  # weights, no tokenizer
    with pytest.raises(RankwiseError, match="has weights but no tokenizer"):
        model_tokenizer(str(bare))
    out = tmp_path / "out"
    assert main(["train", "--model", str(hf_folder), "--preset", "tiny", "--out", str(out)]) == 2
    assert not out.exists()


def test_merged_folder_carries_the_base_tokenizer(hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise import adapters

    model = AutoModelForCausalLM.from_pretrained(hf_folder)
    adapters.apply(model, "lora", r=2, target="q_proj")
    adapters.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(hf_folder))
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    text = "river stone lantern"
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(hf_folder)(text)["input_ids"]
