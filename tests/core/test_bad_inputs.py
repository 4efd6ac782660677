"""Every bad input is one clear line on stderr and exit code 2, and writes nothing.

THE table of bad inputs: a new command joins it by adding rows to ``CLI`` (argv with placeholders, the key word the
one-line error must contain, optional setup). Placeholders: {out} a fresh path (must stay absent), {file} an
existing file, {tmp} the test's folder, {micro} a transformers config folder (no weights), {run} a finished
`rankwise train` run, {adapter} a saved LoRA adapter of {micro}; setups add others ({empty}, {badjson}, ...).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import write_micro_preset

import rankwise.paths
from rankwise import methods
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.train import TrainConfig, train

SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--dtype", "fp32"]


# ------------------------------------------------------------------------------------------------------- setups
def empty_dir(ctx):
    (ctx["tmp"] / "empty").mkdir()
    ctx["empty"] = ctx["tmp"] / "empty"


def bad_json(ctx):
    d = ctx["tmp"] / "badjson"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", ')
    ctx["badjson"] = d


def bad_type(ctx):
    d = ctx["tmp"] / "badtype"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "no-such-architecture"}')
    ctx["badtype"] = d


def no_keys(ctx):
    d = ctx["tmp"] / "nokeys"
    d.mkdir()
    torch.save({"model": {}, "step": 3}, d / "checkpoint.pt")
    ctx["nokeys"] = d


def read_only(ctx):
    ro = ctx["tmp"] / "ro"
    ro.mkdir()
    real = os.access  # root passes every permission check: simulate the read-only mount access(2) reports
    ctx["monkeypatch"].setattr(rankwise.paths.os, "access",
                               lambda p, mode: False if Path(p) == ro else real(p, mode))
    ctx["ro"] = ro


def _adapter_copy(ctx, name, edit):
    d = ctx["tmp"] / name
    shutil.copytree(ctx["adapter"], d)
    edit(d)
    ctx[name] = d


def bad_regex(ctx):
    def edit(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["target_modules"] = "(q_proj"
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    _adapter_copy(ctx, "badregex", edit)


def _edit_tensors(fn):
    def edit(d):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / "adapter_model.safetensors"))
        key = sorted(tensors)[0]
        tensors[key] = fn(tensors[key])
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return edit


def nan_adapter(ctx):
    _adapter_copy(ctx, "nanadapter", _edit_tensors(lambda t: t.fill_(float("nan"))))


def int_adapter(ctx):
    _adapter_copy(ctx, "intadapter", _edit_tensors(lambda t: t.long()))


def bad_instruct(ctx):
    rows = [{"prompt": "alpha", "completion": " beta"}, {"messages": [{"role": "bot", "content": "x"}]}]
    (ctx["tmp"] / "instruct.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ctx["instruct"] = ctx["tmp"] / "instruct.jsonl"


# ---------------------------------------------------------------------------------------------------- the table
# (id, argv, key word of the one-line error, setup or None)
CLI = [
    # --out paths, checked before any work
    ("train-out-empty", ["train", "--out", ""], "is not a folder", None),
    ("train-out-file", ["train", "--out", "{file}"], "existing file", None),
    ("train-out-under-file", ["train", "--out", "{file}/run"], "which is a file", None),
    ("train-out-read-only", ["train", "--out", "{ro}/run"], "not writable", read_only),
    ("train-out-holds-run", ["train", "--out", "{run}"], "already holds a run", None),
    ("bench-out-file", ["bench", "--out", "{file}"], "existing file", None),
    ("bench-out-empty", ["bench", "--out", ""], "is not a folder", None),
    ("merge-out-under-file", ["merge", "{adapter}", "--out", "{file}/m", "--base", "{micro}"], "which is a file", None),
    ("analyze-out-file", ["analyze", "--model", "tiny", "--out", "{file}"], "existing file", None),
    ("analyze-out-read-only", ["analyze", "--model", "tiny", "--out", "{ro}/a"], "not writable", read_only),
    ("compress-out-file", ["compress", "--model", "tiny", "--ratio", "0.5", "--out", "{file}"], "existing file", None),
    ("compress-out-under-file", ["compress", "--model", "tiny", "--ratio", "0.5", "--out", "{file}/c"],
     "which is a file", None),
    ("plan-png-under-file", ["plan", "--compare", "--png", "{file}/p.png"], "which is a file", None),
    ("plan-png-folder", ["plan", "--compare", "--png", "{tmp}"], "is a folder", None),
    # numbers
    ("train-lr-inf", ["train", "--lr", "inf", "--out", "{out}"], "lr must be a finite number", None),
    ("train-lr-negative", ["train", "--lr", "-1e-3", "--out", "{out}"], "lr must be > 0", None),
    ("train-grad-clip-nan", ["train", "--grad-clip", "nan", "--out", "{out}"], "grad_clip must be a finite", None),
    ("train-weight-decay-negative", ["train", "--weight-decay", "-1", "--out", "{out}"], "weight_decay must be >= 0",
     None),
    ("train-scale-nan", ["train", "--method", "galore", "--scale", "nan", "--out", "{out}"],
     "scale must be a finite number", None),
    ("train-alpha-nan", ["train", "--method", "lora", "--alpha", "nan", "--out", "{out}"],
     "alpha must be a finite number", None),
    ("train-rank-0", ["train", "--method", "galore", "--rank", "0", "--out", "{out}"], "rank must be a positive", None),
    ("train-state-bits-3", ["train", "--method", "galore-8bit", "--opt", "state_bits=3", "--out", "{out}"],
     "state_bits must be 8, 4 or None", None),
    ("train-switchlora-interval-below-frozen", ["train", "--method", "switchlora", "--opt", "interval=4", "--out",
                                                "{out}"], "at least 2 x frozen_steps", None),
    ("train-rank-abc", ["train", "--method", "galore", "--opt", "rank=abc", "--out", "{out}"],
     "rank must be an integer", None),
    ("train-lora-rank-above-min-dim", ["train", "--preset", "{micro}", "--method", "lora", "--rank", "100000", *SMALL,
                                       "--out", "{out}"], "larger than min(m, n) = 16", None),
    ("plan-lora-rank-above-min-dim", ["plan", "--model", "tiny", "--method", "lora", "--rank", "100000",
                                      "--seq", "64"], "larger than min(m, n) = 256", None),
    ("plan-sst-rank-above-min-dim", ["plan", "--model", "tiny", "--method", "sst", "--rank", "257", "--seq", "64"],
     "at most the smallest target dimension 256", None),
    ("train-lost-gamma-out-of-range", ["train", "--method", "lost", "--opt", "gamma=2", "--out", "{out}"],
     "gamma (the low-rank part's weight) must be in [0, 1]", None),
    ("plan-budget-overflow", ["plan", "--budget", "1e999GB"], "must be positive and finite", None),
    ("plan-world-not-dividing-batch", ["plan", "--model", "tiny", "--world", "3", "--parallel", "fsdp", "--batch",
                                       "4", "--seq", "64"], "batch 4 is not divisible by the world size 3", None),
    ("plan-world-0", ["plan", "--model", "tiny", "--world", "0", "--seq", "64"], "world must be a positive integer",
     None),
    ("train-fsdp-method-that-cannot-shard", ["train", "--nproc", "2", "--parallel", "fsdp", "--method", "sst",
                                             "--out", "{out}"],
     "--parallel fsdp cannot run --method sst: ", None),
    ("train-fsdp-8bit-state", ["train", "--nproc", "2", "--parallel", "fsdp", "--method", "galore-8bit",
                               "--out", "{out}"], "drop state_bits", None),
    ("train-unknown-side", ["train", "--method", "galore", "--opt", "side=left", "--out", "{out}"],
     "unknown side 'left'; valid: auto, shard", None),
    ("train-steps-negative", ["train", "--steps", "-1", "--out", "{out}"], "steps must be a positive integer", None),
    ("train-seq-len-past-positions", ["train", "--preset", "{micro}", *SMALL[:4], "--seq-len", "100", "--out", "{out}"],
     "larger than the model's 64 positions", None),
    ("analyze-seq-len-past-positions", ["analyze", "--model", "tiny", "--seq-len", "5000", "--batches", "0"],
     "larger than the model's 1024 positions", None),
    ("compress-seq-len-past-positions", ["compress", "--model", "tiny", "--ratio", "0.5", "--seq-len", "5000"],
     "larger than the model's 1024 positions", None),
    # names and options
    ("train-unknown-preset", ["train", "--preset", "nope", "--out", "{out}"], "unknown model preset", None),
    ("train-unknown-method", ["train", "--method", "bogus", "--out", "{out}"], "unknown method 'bogus'", None),
    ("train-missing-data", ["train", "--data", "/no/such/path.txt", "--out", "{out}"], "does not exist", None),
    ("train-instruct-mixed-rows", ["train", "--data", "{instruct}", "--out", "{out}"],
     "instruct.jsonl:2: expected a prompt-completion row", bad_instruct),
    ("train-option-not-taken", ["train", "--rank", "4", "--out", "{out}"], "does not take option(s) rank", None),
    ("train-opt-no-value", ["train", "--opt", "novalue", "--out", "{out}"], "KEY=VALUE", None),
    ("train-extend-without-resume", ["train", "--extend", "--out", "{out}"], "extend goes with resume", None),
    # --preset / --model folders
    ("train-preset-empty-folder", ["train", "--preset", "{empty}", "--out", "{out}"], "holds no config.json",
     empty_dir),
    ("train-preset-broken-config", ["train", "--preset", "{badjson}", "--out", "{out}"], "not valid JSON", bad_json),
    ("train-preset-unknown-model-type", ["train", "--preset", "{badtype}", "--out", "{out}"], "unknown model_type",
     bad_type),
    ("analyze-model-empty-folder", ["analyze", "--model", "{empty}"], "holds no config.json", empty_dir),
    ("analyze-model-no-weights", ["analyze", "--model", "{micro}"], "no weights", None),
    ("compress-model-unknown-type", ["compress", "--model", "{badtype}", "--ratio", "0.5"], "unknown model_type",
     bad_type),
    # resume
    ("resume-other-method", ["train", "--resume", "{run}", "--method", "galore"], "the run used method='full'", None),
    ("resume-other-preset", ["train", "--resume", "{run}", "--preset", "tiny"], "the run used preset=", None),
    ("resume-other-seq-len", ["train", "--resume", "{run}", "--seq-len", "8"], "the run used seq_len=16", None),
    ("resume-other-batch-size", ["train", "--resume", "{run}", "--batch-size", "4"], "the run used batch_size=2",
     None),
    ("resume-unknown-allow-change", ["train", "--resume", "{run}", "--allow-change", "bogus"], "unknown setting",
     None),
    ("resume-checkpoint-lacks-keys", ["train", "--resume", "{nokeys}"], "lacks 'scheduler'", no_keys),
    ("resume-no-checkpoint", ["train", "--resume", "{tmp}/norun"], "no checkpoint", None),
    ("eval-no-checkpoint", ["eval", "{tmp}/norun"], "pass the --out folder of a `rankwise train` run", None),
    ("eval-checkpoint-lacks-keys", ["eval", "{nokeys}"], "lacks 'scheduler'", no_keys),
    # adapters
    ("merge-invalid-regex", ["merge", "{badregex}", "--out", "{out}", "--base", "{micro}"], "not a valid regex",
     bad_regex),
    ("merge-nan-adapter", ["merge", "{nanadapter}", "--out", "{out}", "--base", "{micro}"], "NaN", nan_adapter),
    ("merge-integer-adapter", ["merge", "{intadapter}", "--out", "{out}", "--base", "{micro}"], "floating point",
     int_adapter),
]


@pytest.fixture(scope="module")
def shared(corpus, tmp_path_factory):
    """{micro}, {run} and {adapter}: built once for the module."""
    root = tmp_path_factory.mktemp("bad-inputs")
    micro = write_micro_preset(root / "micro", corpus.vocab_size)
    run = root / "run"
    assert main(["train", "--preset", micro, *SMALL, "--quiet", "--out", str(run)]) == 0
    from rankwise import adapters
    from rankwise.models import build_model

    model = build_model(micro)
    adapters.apply(model, "lora", r=2, target=["q_proj", "v_proj"])
    adapter = root / "adapter"
    adapters.save_adapter(model, adapter, base_model_name_or_path=micro)
    return {"micro": Path(micro), "run": run, "adapter": adapter}


def snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("argv, word, setup", [row[1:] for row in CLI], ids=[row[0] for row in CLI])
def test_bad_cli_input_is_one_line_exit_2_and_writes_nothing(shared, tmp_path, monkeypatch, capsys, argv, word,
                                                             setup):
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    ctx = {**shared, "tmp": tmp_path, "out": tmp_path / "out", "file": file, "monkeypatch": monkeypatch}
    if setup:
        setup(ctx)
    argv = [a.format(**ctx) for a in argv]
    before = {"out": snapshot(ctx["out"]), "run": snapshot(shared["run"]), "tmp": sorted(os.listdir(tmp_path))}
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and word in err and "Traceback" not in err, err
    assert {"out": snapshot(ctx["out"]), "run": snapshot(shared["run"]),
            "tmp": sorted(os.listdir(tmp_path))} == before


# ------------------------------------------------------------------------------------------------ Python API
API = [
    ("lr-string", lambda: TrainConfig(lr="0.1").validate(), "lr must be a finite number, got '0.1'"),
    ("betas-out-of-range", lambda: TrainConfig(betas=(0.9, 1.0)).validate(), "betas must be two numbers in [0, 1)"),
    ("batch-size-0", lambda: TrainConfig(batch_size=0).validate(), "batch_size must be a positive integer"),
    ("steps-float", lambda: TrainConfig(steps=2.5).validate(), "steps must be an integer"),
    ("out-empty", lambda: TrainConfig(out="").validate(), "is not a folder"),
    ("on-nonfinite-unknown", lambda: TrainConfig(on_nonfinite="maybe").validate(), "unknown on_nonfinite"),
    ("allow-change-unknown", lambda: TrainConfig(allow_change=("bogus",)).validate(), "unknown setting"),
    ("method-rank-0", lambda: methods.get("galore", rank=0), "rank must be a positive integer"),
    ("method-rank-abc", lambda: methods.get("galore", rank="abc"), "rank must be an integer"),
    ("method-alpha-nan", lambda: methods.get("lora", alpha=math.nan), "alpha must be a finite number"),
    ("method-bool-option", lambda: methods.get("galore", layerwise="yes"), "layerwise must be true or false"),
    ("method-stagger-not-bool", lambda: methods.get("apollo", stagger="yes"), "stagger must be true or false"),
    ("model-not-causal-lm", lambda: train(TrainConfig(steps=1), model=torch.nn.Linear(2, 2)),
     "must be a causal LM"),
    ("model-not-a-module", lambda: train(TrainConfig(steps=1), model="gpt2"), "must be a causal LM"),
]


@pytest.mark.parametrize("call, word", [row[1:] for row in API], ids=[row[0] for row in API])
def test_bad_python_input_raises_rankwise_error(call, word):
    with pytest.raises(RankwiseError) as e:
        call()
    assert word in str(e.value)


@pytest.mark.parametrize("argv, cfg", [
    (["train", "--lr", "inf"], dict(lr=math.inf)),
    (["train", "--weight-decay", "-1"], dict(weight_decay=-1.0)),
    (["train", "--batch-size", "0"], dict(batch_size=0)),
])
def test_the_cli_prints_the_python_message(capsys, argv, cfg):
    with pytest.raises(RankwiseError) as e:
        TrainConfig(**cfg).validate()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"rankwise train: error: {e.value}"


# ------------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(shared, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(shared["run"], run)
    before = (run / "checkpoint.pt").read_bytes()
    real = torch.save

    def full(obj, f, *args, **kwargs):
        class Full:
            def write(self, b):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, Full(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "checkpoint.pt" in err, err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullFile:  # metrics.jsonl, appended to at every step
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullFile(real_open(self, *a, **k))
                        if self.name == "metrics.jsonl" else real_open(self, *a, **k))
    run2 = tmp_path / "run2"
    shutil.copytree(shared["run"], run2)
    assert main(["train", "--resume", str(run2), "--steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "metrics.jsonl" in err, err
    monkeypatch.undo()

    monkeypatch.setattr(Path, "write_text", no_space)  # the very first write of a new run
    out = tmp_path / "new"
    assert main(["train", "--preset", str(shared["micro"]), *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err, err
    assert [p.name for p in out.iterdir()] == []


def test_a_metrics_line_cut_by_a_crash_stays_resumable(shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shared["run"], run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["step"] = 1  # as if the crash came after the checkpoint of step 1 ...
    torch.save(state, run / "checkpoint.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])  # ... while writing step 2's line
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
