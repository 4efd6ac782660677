"""Ctrl-C at every phase of a step never mislabels a checkpoint: interrupt deterministically (a real SIGINT sent from
a hook, or a KeyboardInterrupt raised there), resume, and compare with a straight run bit for bit."""

from __future__ import annotations

import os
import signal
import types

import pytest
import torch
from reliability_helpers import fresh, micro_config, micro_model, rows, same_weights

import rankwise.train as train_mod
from rankwise import checkpoint
from rankwise.methods import Method
from rankwise.train import train


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler for every test here: a shell that starts pytest in the background (``cmd &``)
    hands it SIGINT ignored, and an ignored signal interrupts nothing (the run's guard rightly stays out of the way)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def interrupt(how: str) -> None:
    if how == "signal":
        sigint()
    else:
        raise KeyboardInterrupt


class Probe(Method):
    """Full-rank AdamW that interrupts inside ``optimizer.step`` or ``after_step`` of step ``at``."""

    def __init__(self, phase: str, how: str, at: int):
        self.phase, self.how, self.at, self.steps = phase, how, at, 0

    def build_optimizer(self, model, cfg):
        opt = super().build_optimizer(model, cfg)
        real = opt.step

        def step(_opt, *args, **kwargs):
            self.steps += 1
            if self.phase != "step" or self.steps != self.at:
                return real(*args, **kwargs)
            if self.how == "signal":  # arrives mid-step: the update must complete, then the checkpoint
                sigint()
                return real(*args, **kwargs)
            group = opt.param_groups[0]  # a half-applied update, then the interrupt
            saved = opt.param_groups[1:]
            opt.param_groups[:] = [group]
            real(*args, **kwargs)
            opt.param_groups[:] = [group, *saved]
            raise KeyboardInterrupt

        opt.step = types.MethodType(step, opt)  # bound, as LR schedulers expect
        return opt

    def after_step(self, step, model, optimizer):
        if self.phase == "after_step" and step == self.at:
            interrupt(self.how)


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
    model0 = micro_model(corpus.vocab_size)
    out = tmp_path_factory.mktemp("straight")
    straight = train(micro_config(out=str(out), checkpoint_every=2), model=fresh(model0), corpus=corpus)
    return model0, straight, rows(out)


def _patch_forward(model, how, at, backward=False):
    calls = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return None
        calls["n"] += 1
        if calls["n"] != at:
            return None
        if not backward:
            interrupt(how)
            return None
        output.register_hook(lambda grad: interrupt(how))  # fires inside loss.backward()
        return None

    layer = model.model.layers[0].mlp
    layer.register_forward_hook(hook)
    return model


# (phase, how, step interrupted, checkpoint step expected after the interrupt)
CASES = [
    ("forward", "signal", 3, 2), ("forward", "raise", 3, 2),
    ("backward", "signal", 3, 2), ("backward", "raise", 3, 2),
    ("step", "signal", 3, 3), ("step", "raise", 3, 2),        # raise: half-applied -> the previous one is kept
    ("after_step", "signal", 3, 3), ("after_step", "raise", 3, 2),
    ("eval", "signal", 4, 4), ("eval", "raise", 4, 4),         # the step is done; its eval is redone on resume
    ("save", "signal", 4, 4), ("save", "raise", 4, 4),         # torch's zip writer turns a raise into RuntimeError
    ("on_step", "signal", 3, 3), ("on_step", "raise", 3, 3),
]


@pytest.mark.parametrize("phase, how, at, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_interrupt_at_each_phase_resumes_bit_exactly(setup, corpus, tmp_path, monkeypatch, phase, how, at, expected):
    model0, straight, straight_rows = setup
    out = tmp_path / "run"
    model, method, on_step = fresh(model0), Method(), None
    if phase in ("forward", "backward"):
        _patch_forward(model, how, at, backward=phase == "backward")
    elif phase in ("step", "after_step"):
        method = Probe(phase, how, at)
    elif phase == "eval":
        real_eval, calls = train_mod.evaluate, {"n": 0}

        def evaluate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1 + at // 2:  # the initial eval, then one every 2 steps
                interrupt(how)
            return real_eval(*args, **kwargs)

        monkeypatch.setattr(train_mod, "evaluate", evaluate)
    elif phase == "save":
        real_save, fired = torch.save, {"n": 0}

        class Tap:  # the file torch's C++ zip writer writes through: the interrupt lands inside the write
            def __init__(self, f):
                self.f = f

            def write(self, b):
                if not fired["n"]:
                    fired["n"] = 1
                    interrupt(how)
                return self.f.write(b)

            def flush(self):
                self.f.flush()

        def save(obj, f, *args, **kwargs):
            return real_save(obj, Tap(f) if checkpoint_step(obj) == at else f, *args, **kwargs)

        def checkpoint_step(obj):
            return obj.get("step") if isinstance(obj, dict) else None

        monkeypatch.setattr(torch, "save", save)
    elif phase == "on_step":
        def on_step(row):
            if row["step"] == at:
                interrupt(how)

    cfg = micro_config(out=str(out), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=model, method=method, corpus=corpus, on_step=on_step)
    monkeypatch.undo()
    state = checkpoint.load(out)
    assert state["step"] == expected
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    resumed = train(micro_config(out=str(out), checkpoint_every=2, resume=str(out)), model=fresh(model0),
                    corpus=corpus)
    assert same_weights(resumed.model, straight.model)
    assert rows(out) == straight_rows
    assert resumed.metrics["final_eval_loss"] == straight.metrics["final_eval_loss"]


def test_sigint_through_the_cli_exits_130_and_resumes(corpus, tmp_path, monkeypatch, capsys):
    from reliability_helpers import write_micro_preset

    from rankwise.cli.main import main

    preset = write_micro_preset(tmp_path / "micro", corpus.vocab_size)
    args = ["train", "--preset", preset, "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--dtype", "fp32", "--quiet"]
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0
    real_eval, calls = train_mod.evaluate, {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            sigint()
        return real_eval(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert "interrupted" in capsys.readouterr().err
    assert checkpoint.load(out)["step"] == 2
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert rows(out) == rows(straight)
    a, b = checkpoint.load(out)["model"], checkpoint.load(straight)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_during_a_layerwise_backward_completes_the_step(corpus, setup, tmp_path):
    """Layer-wise GaLore updates the weights inside backward: a Ctrl-C there waits for the step to finish."""
    model0 = setup[0]
    opts = dict(method="galore", method_options={"rank": 4, "layerwise": True}, grad_clip=0.0)
    straight = train(micro_config(**opts), model=fresh(model0), corpus=corpus)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(micro_config(out=str(out), **opts), model=_patch_forward(fresh(model0), "signal", 3, backward=True),
              corpus=corpus)
    assert checkpoint.load(out)["step"] == 3
    resumed = train(micro_config(out=str(out), resume=str(out), **opts), model=fresh(model0), corpus=corpus)
    assert same_weights(resumed.model, straight.model)
