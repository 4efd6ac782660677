import json
import re

import pytest
import torch

from analysis_helpers import small_llama
from rankwise.cli.main import main
from rankwise.models import build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("model")
    small_llama(vocab=corpus.vocab_size).save_pretrained(path)
    corpus.save_tokenizer(path)  # a model folder with weights carries its tokenizer (else: one clear error)
    return str(path)


def test_analyze_writes_tables_json_and_figures(model_dir, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "--model", model_dir, "--batches", "2", "--batch-size", "2", "--seq-len", "16",
                 "--rank", "4", "--out", str(out)]) == 0
    text, err = capsys.readouterr()
    # progress on stderr: weight spectra + 2 gradient batches + gradient spectra + attention limits + files
    assert re.search(r"^analyze: 6/6 steps \(files\), elapsed \d+[sm], ETA 0s$", err, re.M), err
    assert "computational limits" in text and "0.attn.q_proj" in text
    result = json.loads((out / "analysis.json").read_text())
    assert result["batches"] == 2 and len(result["layers"]) == 14 and len(result["attention_limits"]) == 2
    assert {"grad_effective_rank", "drift_overlap", "weight_stable_rank"} <= set(result["layers"][0])
    for png in ("heatmap.png", "spectra.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", "--model", model_dir, "--batches", "0", "--json"]) == 0
    weights_only = json.loads(capsys.readouterr().out)
    assert weights_only["attention_limits"] == [] and "grad_stable_rank" not in weights_only["layers"][0]


def test_compress_ratio_zero_keeps_ppl_and_ratio_half_writes_a_smaller_model(model_dir, tmp_path, capsys):
    assert main(["compress", "--model", model_dir, "--ratio", "0", "--eval-batches", "1", "--seq-len", "16",
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["seq_len"] == 16
    assert same["ppl_after"] == pytest.approx(same["ppl_before"], rel=1e-6) and same["rank_reduction"] == 0
    out = tmp_path / "small"
    assert main(["compress", "--model", model_dir, "--ratio", "0.5", "--min-ratio", "0.45", "--eval-batches", "1",
                 "--seq-len", "16", "--out", str(out), "--json"]) == 0
    text, err = capsys.readouterr()
    res = json.loads(text)
    assert re.search(r"^compress: 4/4 stages \(write\), elapsed \d+[sm], ETA 0s$", err, re.M), err
    assert res["params_after"] < res["params_before"] and res["lrc"]
    saved = json.loads((out / "welore.json").read_text())
    assert saved["ranks"] == res["ranks"]
    reloaded = build_model(str(out))  # the factors, loaded back: the compressed function
    assert saved["factored"] and all(reloaded.get_submodule(n).rank == k for n, k in saved["factored"].items())
    dense = tmp_path / "dense"
    assert main(["compress", "--model", model_dir, "--ratio", "0.5", "--min-ratio", "0.45", "--eval-batches", "0",
                 "--out", str(dense), "--dense"]) == 0
    assert "weights" in capsys.readouterr().out
    # the factors are smaller on disk than the dense B A, which plain transformers loads with the same function
    saved_bytes = (dense / "model.safetensors").stat().st_size - (out / "welore.safetensors").stat().st_size
    # fp32 parameters saved, up to the safetensors header (longer with the factored layers' key names)
    assert saved_bytes == pytest.approx(4 * (res["params_before"] - res["params_after"]), abs=1024)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(dense)
    x = torch.randint(0, 100, (1, 12))
    assert torch.allclose(plain(x).logits, reloaded(x).logits, atol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("x = 1")["input_ids"] == AutoTokenizer.from_pretrained(model_dir)(
        "x = 1")["input_ids"]  # with the model's tokenizer
    w = reloaded.get_submodule(res["lrc"][0]).weight
    assert torch.linalg.matrix_rank(w.double(), rtol=1e-4).item() == res["ranks"][res["lrc"][0]]


@pytest.mark.parametrize("argv, message", [
    (["compress", "--model", "no-such-model", "--ratio", "0.5"], "neither a preset"),
    (["compress", "--model", "tiny", "--ratio", "1.5", "--eval-batches", "0"], "ratio"),
    (["analyze", "--model", "tiny", "--batches", "-1"], "--batches"),
])
def test_bad_inputs_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compress_refuses_a_non_empty_out(model_dir, tmp_path, capsys):
    (tmp_path / "x").write_text("keep")
    assert main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_compress_peft_writes_welore_ranks_as_a_peft_rank_pattern(model_dir, tmp_path, capsys):
    """--peft: the low-rank components as a PEFT LoRA (per-layer ranks in rank_pattern) over a base with those
    layers zero; peft's PeftModel on it computes the compressed model (the factored folder's function)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    common = ["compress", "--model", model_dir, "--ratio", "0.5", "--min-ratio", "0.3", "--eval-batches", "0"]
    assert main([*common, "--out", str(tmp_path / "factored")]) == 0
    assert main([*common, "--peft", "--out", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    factored = json.loads((tmp_path / "factored" / "welore.json").read_text())["factored"]  # the B A layers
    config = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    ranks = {n: config["rank_pattern"].get(n, config["r"]) for n in config["target_modules"]}
    assert ranks == factored and len(set(ranks.values())) > 1 and config["rank_pattern"]
    assert all(config["alpha_pattern"].get(n, config["lora_alpha"]) == k for n, k in ranks.items())  # scaling 1
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft")
    assert all(base.get_submodule(n).weight.abs().max() == 0 for n in ranks)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / "adapter")).eval()
    x = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = build_model(str(tmp_path / "factored")).eval()(input_ids=x).logits
        assert (adapted(input_ids=x).logits - expected).abs().max() <= 1e-5
    assert main([*common, "--peft", "--eora", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "--peft writes WeLore's low-rank components" in capsys.readouterr().err
