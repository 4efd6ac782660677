"""rankwise methods inside transformers.Trainer, through the example script."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.integrations.hf import rankwise_setup
from rankwise.metrics import optimizer_state_bytes
from rankwise.models import build_model

EXAMPLE = Path(__file__).parents[2] / "examples" / "hf_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_with_galore_trains_and_uses_the_projected_optimizer(corpus, capsys):
    result = _example().main(["--method", "galore", "--rank", "8", "--steps", "12", "--seq-len", "32",
                              "--batch-size", "4", "--eval-windows", "8"])
    assert result["after"] < result["before"] - 0.5
    opt = result["setup"].optimizer
    assert type(opt).__name__ == "SplitOptimizer"
    assert optimizer_state_bytes(opt) == opt.expected_state_bytes() > 0
    # rankwise's schedule ran to the end: cosine from 1e-2 down to 0.1 x
    assert result["setup"].scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    assert "galore: eval loss" in capsys.readouterr().out


def test_trainer_with_lora_trains_only_the_adapter(corpus):
    base = build_model("tiny", vocab_size=corpus.vocab_size, seed=0)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    result = _example().main(["--method", "lora", "--rank", "4", "--steps", "6", "--seq-len", "32", "--lr", "1e-2",
                              "--batch-size", "4", "--eval-windows", "8"])
    model = result["setup"].model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    frozen_after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen_after) == {k for k in frozen if "rotary" not in k}
    for k, p in frozen_after.items():
        assert torch.equal(p, frozen[k]), k
    assert result["after"] < result["before"]


def test_setup_errors_are_clear():
    from transformers import TrainingArguments

    model = build_model("tiny", seed=0)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(RankwiseError, match="max_steps"):
        rankwise_setup(model, "full", args)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, max_steps=3)
    with pytest.raises(RankwiseError, match="calibration"):
        rankwise_setup(model, "lora-ga", args, rank=4)
    with pytest.raises(RankwiseError, match="unknown method"):
        rankwise_setup(model, "nope", args)
