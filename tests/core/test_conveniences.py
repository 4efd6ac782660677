"""`rankwise generate`, `--config FILE` (and its override order), the default run folder, `rankwise methods`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from rankwise_testing import quick_config

from rankwise.cli.main import main, parse_args
from rankwise.cli.train import config_from_args, default_out
from rankwise.generation import generate, prompt_ids
from rankwise.train import train


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    res = train(quick_config(steps=3, seq_len=32, eval_batches=1, out=str(out)), corpus=corpus)
    return out, res


def sample_by_hand(model, ids, n, temperature, seed, eos):
    """Recompute the full forward pass each step (no cache); sample with the documented rule."""
    g = torch.Generator().manual_seed(seed)
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            tok = int(logits.argmax()) if temperature == 0 else int(
                torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
            new.append(tok)
            ids.append(tok)
            if tok == eos:
                break
    return new


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_matches_an_uncached_loop(run, corpus, temperature):
    _, res = run
    tok = corpus.hf_tokenizer
    out = generate(res.model, tok, "def add(a, b):", max_new_tokens=12, temperature=temperature, seed=3)
    ids = prompt_ids(tok, "def add(a, b):")
    assert ids[0] == tok.eos_token_id and ids[1:] == tok("def add(a, b):")["input_ids"]
    assert out.new_ids == sample_by_hand(res.model, ids, 12, temperature, 3, tok.eos_token_id)
    assert out.text == tok.decode(out.new_ids, skip_special_tokens=True)


def test_generate_cli_uses_the_runs_tokenizer(run, capsys):
    from transformers import AutoTokenizer

    out, res = run
    assert main(["generate", str(out), "--prompt", "import os", "--max-new-tokens", "6", "--seed", "1",
                 "--temperature", "0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(out)
    assert result["prompt_ids"][1:] == tok("import os")["input_ids"]
    assert result["new_ids"] == generate(res.model, tok, "import os", 6, 0.5, 1).new_ids
    assert result["text"] == tok.decode(result["new_ids"], skip_special_tokens=True)
    assert main(["generate", str(out), "--temperature", "-1"]) == 2


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'steps = 7\nseq-len = 48\nlr = 0.01\nmethod = "galore"\nrank = 16\n[opt]\nupdate_gap = 5\n'),
    (".yaml", "steps: 7\nseq_len: 48\nlr: 0.01\nmethod: galore\nrank: 16\nopt: {update_gap: 5}\n"),
])
def test_config_file_then_command_line_override_order(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    cfg = config_from_args(parse_args(["train", "--config", str(path), "--steps", "5", "--opt", "update_gap=9"]))
    assert cfg.steps == 5                     # command line beats the file
    assert cfg.seq_len == 48 and cfg.lr == 0.01 and cfg.method == "galore"  # the file beats the defaults
    assert cfg.batch_size == 8                # untouched: the default
    assert cfg.method_options == {"rank": 16, "update_gap": 9}
    bench_cfg = tmp_path / f"bench{suffix}"
    bench_cfg.write_text(text.replace("galore", "full,galore").replace("method", "methods").split("[opt]")[0]
                         .split("opt:")[0])
    bench = parse_args(["bench", "--config", str(bench_cfg), "--seq-len", "16"])
    assert bench.steps == 7 and bench.seq_len == 16 and bench.rank == 16 and bench.methods == "full,galore"


@pytest.mark.parametrize("text, message", [
    ("stepz = 3\n", "unknown key 'stepz'"),
    ('steps = "many"\n', "must be an integer"),
    ("steps = 1.5\n", "must be an integer"),
    ('dtype = "fp16"\n', "must be one of fp32, bf16"),
    ("steps = \n", "not valid TOML"),
])
def test_bad_config_file_is_one_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankwise train: error:") and message in err and err.count("\n") == 0


def test_train_without_out_saves_under_runs_method_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = default_out("galore")
    assert re.fullmatch(r"runs/galore-\d{8}-\d{6}", first)
    (tmp_path / first).mkdir(parents=True)
    assert default_out("galore", "runs") in (first + "-2", re.sub(r"\d{6}$", "", first))  # never the same folder
    assert main(["train", "--steps", "2", "--seq-len", "16", "--eval-batches", "1", "--dtype", "fp32",
                 "--quiet"]) == 0
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("full-")]
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists() and (runs[0] / "tokenizer.json").exists()


def test_methods_shows_real_defaults_in_80_columns(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 80
    lora = re.search(r"\n  lora +.*?(?=\n  \S)", text, re.S).group(0)  # its lines up to the next method
    assert "r=8 (or rank)" in lora and "None" not in lora
    assert "r=256" in text[text.index("  vera "):]
    assert main(["methods", "--json"]) == 0
    infos = {m["name"]: m["options"] for m in json.loads(capsys.readouterr().out)}
    assert infos["lora"]["r"] == 8 and infos["galore"]["rank"] == 128


def test_bf16_on_a_cpu_without_native_bf16_warns_once_with_the_fix(monkeypatch, caplog):
    import logging

    import torch

    from rankwise import train as train_mod

    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="rankwise"):
        train_mod.warn_slow_bf16(torch.device("cpu"), "bf16")
        train_mod.warn_slow_bf16(torch.device("cpu"), "fp32")  # fp32: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "bf16 autocast on this CPU (no AVX512-BF16 / AMX) is emulated, ~8x slower than fp32: use --dtype fp32"]
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    caplog.clear()
    train_mod.warn_slow_bf16(torch.device("cpu"), "bf16")
    assert not caplog.records
