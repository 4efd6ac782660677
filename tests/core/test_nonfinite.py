"""NaN / inf guard: a NaN injected at step k stops the run (default) naming the step and the tensor, the last good
checkpoint survives, metrics files stay valid JSON; ``on_nonfinite="skip"`` skips that step's update."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reliability_helpers import fresh, micro_config, micro_model, rows

from rankwise import checkpoint
from rankwise.atomic import json_dumps
from rankwise.errors import NonFiniteError
from rankwise.methods import Method
from rankwise.train import perplexity, train


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json would accept)."""
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def nan_in_loss_at(model, k):
    """The k-th training forward returns NaN logits."""
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == k:
                return output * float("nan")
        return None

    model.lm_head.register_forward_hook(hook)
    return model


GRAD_PARAM = "model.layers.0.mlp.down_proj.weight"


def nan_in_grad_at(model, k):
    """Step k's gradient of GRAD_PARAM is NaN (the loss stays finite)."""
    calls = {"n": 0}
    param = model.get_parameter(GRAD_PARAM)

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == k else grad

    param.register_hook(hook)
    return model


@pytest.fixture(scope="module")
def model0(corpus):
    return micro_model(corpus.vocab_size)


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(corpus, model0, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss.*first non-finite gradient: \S+") as e:
        train(micro_config(out=str(out), checkpoint_every=2), model=nan_in_loss_at(fresh(model0), 4),
              corpus=corpus)
    assert "the checkpoint of step 3 is kept" in str(e.value)
    state = checkpoint.load(out)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]
    assert not (out / "metrics.json").exists()
    # the stop is bit-exact: resuming (the NaN was a one-off) equals a straight run
    straight = train(micro_config(), model=fresh(model0), corpus=corpus)
    resumed = train(micro_config(out=str(out), checkpoint_every=2, resume=str(out)), model=fresh(model0),
                    corpus=corpus)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))


def test_nan_gradient_names_the_parameter(corpus, model0):
    with pytest.raises(NonFiniteError, match=rf"step 2: non-finite grad_norm.*{GRAD_PARAM}"):
        train(micro_config(), model=nan_in_grad_at(fresh(model0), 2), corpus=corpus)
    with pytest.raises(NonFiniteError, match=rf"step 2: non-finite grad_norm.*{GRAD_PARAM}"):  # norm without clip
        train(micro_config(grad_clip=0.0), model=nan_in_grad_at(fresh(model0), 2), corpus=corpus)


def test_skip_mode_skips_the_step_and_writes_valid_json(corpus, model0, tmp_path):
    out = tmp_path / "run"
    res = train(micro_config(out=str(out), on_nonfinite="skip"), model=nan_in_loss_at(fresh(model0), 3),
                corpus=corpus)
    assert res.metrics["skipped_steps"] == [3] and res.metrics["steps"] == 6
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    row3 = strict_json(lines[3])
    assert row3["step"] == 3 and row3["loss"] is None and row3["grad_norm"] is None
    assert row3["skipped"].startswith("non-finite loss")
    assert strict_json((out / "metrics.json").read_text())["skipped_steps"] == [3]
    assert math.isfinite(res.metrics["final_eval_loss"])


class PoisonAfter(Method):
    """Sets a weight to NaN after step ``at``'s update (as an overflowing update would)."""

    def __init__(self, at):
        self.at = at

    def after_step(self, step, model, optimizer):
        if step == self.at:
            with torch.no_grad():
                model.get_parameter(GRAD_PARAM)[0, 0] = float("nan")


def test_nonfinite_weights_never_overwrite_a_finite_checkpoint(corpus, model0, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=rf"{GRAD_PARAM}.*checkpoint of step 2 is kept"):
        train(micro_config(out=str(out), checkpoint_every=2, eval_every=0), model=fresh(model0),
              method=PoisonAfter(4), corpus=corpus)
    state = checkpoint.load(out)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    # skip cannot help once the weights themselves are non-finite: it stops too
    with pytest.raises(NonFiniteError, match="weights are already non-finite"):
        train(micro_config(on_nonfinite="skip", eval_every=0), model=fresh(model0), method=PoisonAfter(2),
              corpus=corpus)


def test_huge_eval_loss_gives_inf_perplexity_and_json_null():
    assert perplexity(800.0) == math.inf and perplexity(1.0) == pytest.approx(math.e)
    assert strict_json(json_dumps({"eval_ppl": perplexity(800.0), "x": [float("nan"), 1.5]})) == \
        {"eval_ppl": None, "x": [None, 1.5]}


def test_cli_nan_exits_3_with_one_line(corpus, model0, tmp_path, monkeypatch, capsys):
    from reliability_helpers import write_micro_preset

    import rankwise.train as train_mod
    from rankwise.cli.main import main

    real_build = train_mod._build_model
    monkeypatch.setattr(train_mod, "_build_model", lambda *a: nan_in_loss_at(real_build(*a), 2))
    preset = write_micro_preset(tmp_path / "micro", corpus.vocab_size)
    out = tmp_path / "run"
    code = main(["train", "--preset", preset, "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--dtype", "fp32", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.count("\n") == 0 and "step 2: non-finite loss" in err, err
    assert checkpoint.load(out)["step"] == 1


def test_layerwise_update_checks_the_loss_before_backward_updates_the_weights(corpus, model0, tmp_path):
    out = tmp_path / "run"
    cfg = micro_config(out=str(out), method="galore", method_options={"rank": 4, "layerwise": True}, grad_clip=0.0)
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss"):
        train(cfg, model=nan_in_loss_at(fresh(model0), 3), corpus=corpus)
    state = checkpoint.load(out)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
