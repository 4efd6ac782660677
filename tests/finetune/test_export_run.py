"""Export: every adapter run writes ``RUN/adapter/`` (peft loads it), ``rankwise export RUN --merged DIR`` writes a
transformers folder with the adapted model's logits, ``--adapter DIR`` the adapter; bad input leaves nothing."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from finetune_helpers import logits, model_folder, quick_run, save_tokenizer, text_corpus, tokens

from rankwise.cli.main import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base, data = model_folder(root / "base"), text_corpus(root / "data.jsonl")
    plain = quick_run(root / "plain", base, data)
    nf4 = quick_run(root / "nf4", base, data, quantize="nf4")
    return {"root": root, "base": base, "plain": (root / "plain", plain.model),
            "nf4": (root / "nf4", nf4.model)}


def test_every_adapter_run_writes_a_peft_adapter_folder(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, model = runs["plain"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == runs["base"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), str(run / "adapter"))
    x = tokens()
    assert (logits(peft, x) - logits(model, x)).abs().max() <= 1e-5
    assert (logits(model, x) - logits(AutoModelForCausalLM.from_pretrained(runs["base"]), x)).abs().max() > 1e-3


def test_merged_folder_loads_in_plain_transformers_with_the_adapted_logits(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, model = runs["plain"]
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.dtype == torch.float32 and (tmp_path / "merged" / "model.safetensors").is_file()
    x = tokens()
    assert (logits(merged, x) - logits(model, x)).abs().max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))  # the run's corpus tokenizer, as transformers'
    assert tok("alpha beta")["input_ids"]


def test_adapter_export_equals_the_run_adapter(runs, tmp_path):
    run, _ = runs["plain"]
    assert main(["export", str(run), "--adapter", str(tmp_path / "a")]) == 0
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (run / "adapter" / f).read_bytes()


def test_merging_a_quantized_base_writes_bf16_close_to_the_quantized_model(runs, tmp_path):
    """deq(Q) + Delta W in fp32 is the quantized model's function (<= 1e-5); bf16 adds its rounding only."""
    from transformers import AutoModelForCausalLM

    run, model = runs["nf4"]
    x = tokens()
    want = logits(model, x)
    assert main(["export", str(run), "--merged", str(tmp_path / "bf16")]) == 0
    assert main(["export", str(run), "--merged", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    bf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert bf16.dtype == torch.bfloat16
    fp32 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"))
    assert (logits(fp32, x) - want).abs().max() <= 1e-5
    err = (logits(bf16, x) - want).abs().max() / want.abs().max()
    assert 0 < err < 3e-2  # bf16's 8-bit mantissa (measured ~1e-2 of the logits' range on this model)


def test_requantized_merge_writes_int8_that_transformers_loads(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run, model = runs["nf4"]
    assert main(["export", str(run), "--merged", str(tmp_path / "q"), "--requantize", "int8"]) == 0
    q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert type(q.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    x = tokens()
    want = logits(model, x)
    err = (logits(q, x) - want).abs().max() / want.abs().max()
    assert 0 < err < 5e-2  # a second quantization on top of bf16 (measured ~1e-2 here)


@pytest.mark.parametrize("argv, message", [
    (["export", "{root}", "--merged", "{out}"], "not a run folder"),
    (["export", "{plain}", "--merged", "{root}"], "not an empty folder"),
    (["export", "{plain}", "--adapter", "{out}", "--dtype", "bf16"], "go with --merged"),
    (["export", "{plain}", "--merged", "{out}", "--requantize", "nf4"], "use --requantize int8"),
])
def test_bad_input_is_one_clear_line(runs, tmp_path, capsys, argv, message):
    fill = {"root": str(runs["root"]), "plain": str(runs["plain"][0]), "out": str(tmp_path / "out")}
    assert main([a.format(**fill) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_config_and_a_missing_extra_fail_cleanly(runs, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["plain"][0], run)
    base = tmp_path / "base"
    shutil.copytree(runs["base"], base)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["preset"] = str(base)
    torch.save(state, run / "checkpoint.pt")
    (base / "config.json").unlink()
    assert main(["export", str(run), "--merged", str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if the [quant] extra were not installed
    assert main(["export", str(runs["nf4"][0]), "--merged", str(tmp_path / "out")]) == 2
    assert "rankwise[quant]" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_train_quantize_bad_input_writes_nothing(tmp_path, capsys):
    from rankwise.models import build_model

    data = text_corpus(tmp_path / "d.jsonl")
    odd = tmp_path / "odd"  # hidden 40 x ffn 50: 2000 weights per MLP matrix, not a multiple of NF4's 64-blocks
    build_model("tiny", vocab_size=512, hidden_size=40, intermediate_size=50, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(str(odd))
    save_tokenizer(odd)
    common = ["--data", data, "--vocab-size", "300", "--steps", "1", "--seq-len", "16", "--quiet"]
    for argv, message in ((["--preset", str(odd), "--method", "lora", "--target", "all-linear"], "blocks of 64"),
                          (["--preset", str(odd), "--method", "full"], "adapter method")):
        out = tmp_path / "out"
        assert main(["train", *argv, "--quantize", "nf4", *common, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_a_quantized_run_resumes_bit_exactly_and_evaluates(runs, tmp_path, capsys):
    from rankwise.train import evaluate_checkpoint

    run, model = runs["nf4"]
    cut = tmp_path / "cut"
    quick_run(cut, runs["base"], str(runs["root"] / "data.jsonl"), quantize="nf4", stop_at=2)
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    full = json.loads((run / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    assert evaluate_checkpoint(str(cut))["eval_loss"] == pytest.approx(full["final_eval_loss"], abs=1e-6)
