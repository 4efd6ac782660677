import copy
import json
import re

import pytest
import torch

from rankwise import methods
from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.methods import OptimConfig
from rankwise.models import build_model
from rankwise.plan import activation_bytes, breakdown, held_gradient_bytes, parse_bytes, plan
from rankwise.train import lm_loss

METHODS = [m.name for m in methods.available()]
RANK = 8
COUNTED = ("weights_trainable", "weights_frozen", "gradients", "optimizer_state")


def _options(name: str) -> dict:
    extra = {"total_step": 10} if "total_step" in methods.info(name).options() else {}  # AdaLoRA's schedule
    return {"rank": RANK, **extra} if "rank" in methods.info(name).options() else extra


@pytest.fixture(scope="module")
def base_models():
    return {preset: build_model(preset, seed=0) for preset in ("tiny", "small")}


@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", METHODS)
def test_planned_weights_grads_and_state_equal_measured_after_a_real_step(base_models, preset, name):
    method = methods.get(name, **_options(name))
    model = copy.deepcopy(base_models[preset])
    torch.manual_seed(0)
    batch = torch.randint(0, 8192, (2, 33))
    if method.calibration_batches:
        method.calibrate(model, [batch] * method.calibration_batches)
    model = method.prepare(model)
    optimizer = method.build_optimizer(model, OptimConfig())
    loss = lm_loss(model, batch)
    aux = method.aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    gradients = held_gradient_bytes(model)  # at their peak: some optimizers (AltLoRA) free some in step()
    optimizer.step()
    measured = {**breakdown(model, optimizer), "gradients": gradients}
    planned = plan(preset, name, batch=2, seq=32, dtype="fp32", options=_options(name))
    assert {k: planned.bytes[k] for k in COUNTED} == measured
    assert planned.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planned.total_params == sum(p.numel() for p in model.parameters())


def test_closed_forms_full_adamw_and_galore():
    full = plan("llama-60m", "full", dtype="bf16", seq=256)
    n = full.trainable_params
    tensors = 8 * 9 + 3  # per layer: 7 linears + 2 norms; embeddings, final norm, head
    assert full.bytes["weights_trainable"] == full.bytes["gradients"] == 2 * n
    assert full.bytes["optimizer_state"] == 2 * 2 * n + 4 * tensors  # bf16 moments + fp32 step per tensor
    galore = plan("llama-60m", "galore", rank=128, dtype="bf16", seq=256)
    h, f, r = 512, 1376, 128
    # per layer: 4 attention (512x512) and 3 MLP (512x1376 / 1376x512) projected matrices, d = 512 every time
    projected = 4 * (h * r + 2 * r * h) + 3 * (h * r + 2 * r * f)
    plain = n - 8 * (4 * h * h + 3 * h * f)
    assert galore.bytes["optimizer_state"] == 2 * (8 * projected + 2 * plain) + 4 * tensors
    # GaLore paper, Table 2 (weights + optimizer state, bf16), full rank 60M: 0.36G
    weights = full.bytes["weights_trainable"]
    assert (weights + full.bytes["optimizer_state"]) / 1e9 == pytest.approx(0.36, abs=0.015)


def test_layerwise_holds_one_gradient_and_adapters_freeze_the_base():
    lw = plan("tiny", "galore", rank=8, options={"layerwise": True}, dtype="fp32", seq=64)
    plain = plan("tiny", "galore", rank=8, dtype="fp32", seq=64)
    assert lw.bytes["optimizer_state"] == plain.bytes["optimizer_state"] > 0
    assert lw.bytes["gradients"] == 8192 * 256 * 4 < plain.bytes["gradients"]  # the largest matrix: embeddings
    lora = plan("tiny", "lora", rank=8, dtype="fp32", seq=64)
    assert lora.bytes["weights_frozen"] >= plain.bytes["weights_trainable"]
    assert lora.bytes["gradients"] == lora.bytes["weights_trainable"] == 4 * 4 * 2 * 8 * (256 + 256)


def test_activation_estimate_and_checkpointing():
    from rankwise.models import llama_config

    cfg = llama_config("tiny")
    a1 = activation_bytes(cfg, 1, 64, 4)
    assert activation_bytes(cfg, 2, 64, 4) == 2 * a1  # linear in tokens
    per_layer = 64 * ((9 * 256 + 2 * 256 + 4 * 688) * 4 + 4 * 4 + 8)
    head = 64 * (3 * 256 * 4 + 8192 * 4 + 8192 * 4) + 64 * 8
    assert a1 == 4 * per_layer + head
    assert activation_bytes(cfg, 1, 64, 4, checkpointing=True) == 4 * 64 * 256 * 4 + per_layer + head
    p = plan("tiny", "full", seq=64, batch=1, dtype="fp32", checkpointing=True)
    assert p.total == sum(p.bytes[k] for k in COUNTED) + p.bytes["activations_checkpointed"]


def test_budget_fits_and_largest_rank_is_exact():
    p = plan("llama-60m", "galore", rank=128, seq=256, budget="1GB")
    assert p.fits and p.budget == 10**9
    tight = plan("llama-60m", "galore", rank=128, seq=256, budget=p.total - 1)
    assert tight.fits is False
    best = tight.largest_rank
    assert best is not None and best < 128
    assert plan("llama-60m", "galore", rank=best, seq=256).total <= tight.budget
    assert plan("llama-60m", "galore", rank=best + 1, seq=256).total > tight.budget
    assert plan("llama-60m", "full", seq=256, budget="1GB").largest_rank is None  # no rank option


def test_plan_counts_the_state_of_a_given_period():
    """FRUGAL's sampled blocks differ per period (so does its state); LISA keeps the moments of every block it has
    visited; AdamW holds the same state in every period."""
    from rankwise.optim import build

    model = build_model("tiny", seed=0)
    for name in ("frugal", "lisa"):
        opt = build(name, model, update_gap=2)
        states = [plan("tiny", name, batch=2, seq=32, dtype="fp32", options={"update_gap": 2}, period=q)
                  .bytes["optimizer_state"] for q in range(3)]
        assert states == [opt.expected_state_bytes(q) for q in range(3)]
        assert len(set(states)) > 1, name
    full = [plan("tiny", "full", batch=2, seq=32, dtype="fp32", period=q).bytes["optimizer_state"] for q in (0, 3)]
    assert full[0] == full[1]
    with pytest.raises(RankwiseError, match="period must be a non-negative integer"):
        plan("tiny", "frugal", seq=32, period=-1)


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24g", 24 * 2**30),
                                            ("512 MiB", 512 * 2**20), ("1.5e9", 1.5e9), (1000, 1000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_meta_step_failure_asks_for_the_override_hook_and_the_hook_is_used():
    class ItemAdam(torch.optim.Adam):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["norm"] = torch.tensor(p.grad.norm().item())
            return None

    class Reads(methods.Method):
        name = "reads"

        def build_optimizer(self, model, cfg):
            return ItemAdam(model.parameters())

    class Hooked(Reads):
        def planned_state_bytes(self, model, optimizer):
            return 4 * sum(1 for p in model.parameters() if p.requires_grad)

    from rankwise.plan import _config, _meta_model, _state_bytes

    model = _meta_model(_config("tiny", None), torch.float32)
    with pytest.raises(RankwiseError, match="planned_state_bytes"):
        _state_bytes(Reads(), model, Reads().build_optimizer(model, None))
    hooked = Hooked()
    opt = hooked.build_optimizer(model, None)
    assert breakdown(model, opt, _state_bytes(hooked, model, opt))["optimizer_state"] == 4 * 39


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "gpt-9"], "valid presets: tiny, mini, small"),
    (["plan", "--model", "gpt-9"], "any transformers config"),
    (["plan", "--budget", "lots"], "cannot parse memory budget 'lots'"),
    (["plan", "--budget=0GB"], "memory budget must be positive"),
    (["plan", "--method", "full", "--rank", "4"], "does not take option(s) rank"),
    (["plan", "--model", "tiny", "--seq", "4096"], "longer than the model's 1024 positions"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_cli_table_json_and_compare_chart(tmp_path, capsys):
    assert main(["plan", "--model", "llama-60m", "--method", "galore", "--rank", "64", "--seq", "256",
                 "--budget", "2GiB"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "fits" in out and "largest rank that fits: 512" in out
    assert main(["plan", "--model", "tiny", "--method", "lora", "--rank", "4", "--seq", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == sum(data["bytes"][k] for k in (*COUNTED, "activations"))
    png = tmp_path / "compare.png"
    assert main(["plan", "--model", "tiny", "--rank", "8", "--seq", "64", "--compare", "--png", str(png),
                 "--methods", "full,galore,lora,lowrank"]) == 0
    out, err = capsys.readouterr()
    assert all(m in out for m in ("full", "galore", "lora", "lowrank"))
    # progress on stderr (plain, not a terminal): the last method planned, the elapsed time, the ETA
    assert re.search(r"^plan --compare: 4/4 methods \(lowrank\), elapsed \d+[sm], ETA 0s$", err, re.M), err
    assert png.stat().st_size > 10_000


def test_plan_takes_train_target_and_names_the_switches_that_would_fit(capsys):
    from rankwise.plan import GIB, plan

    qv = plan("tiny", "lora", rank=8, seq=64)
    every = plan("tiny", "lora", rank=8, seq=64, options={"target": "all-linear"})
    assert every.trainable_params == 8 * sum((i + o) for i, o in [(256, 256)] * 4 + [(256, 688)] * 2 +
                                             [(688, 256)]) * 4 > qv.trainable_params
    assert main(["plan", "--model", "tiny", "--method", "lora", "--rank", "8", "--seq", "64", "--target",
                 "all-linear", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == every.trainable_params
    # galore does not fit; the switches, each total equal to the plan with that switch
    base = plan("llama-60m", "galore", rank=64, batch=8, seq=256)
    ckpt = plan("llama-60m", "galore", rank=64, batch=8, seq=256, checkpointing=True)
    layer = plan("llama-60m", "galore", rank=64, batch=8, seq=256, options={"layerwise": True})
    both = plan("llama-60m", "galore", rank=64, batch=8, seq=256, checkpointing=True, options={"layerwise": True})
    assert both.total < ckpt.total < base.total and both.total < layer.total
    budget = (both.total + min(ckpt.total, layer.total)) // 2  # only both switches together fit
    tight = plan("llama-60m", "galore", rank=64, batch=8, seq=256, budget=budget)
    assert not tight.fits and {
        f"with --checkpointing: {ckpt.total / GIB:.2f} GiB, does NOT fit",
        f"with --opt layerwise=true: {layer.total / GIB:.2f} GiB, does NOT fit",
        f"with --checkpointing --opt layerwise=true: {both.total / GIB:.2f} GiB, fits"} <= set(tight.notes)
    eight = plan("llama-60m", "galore", rank=64, batch=8, seq=256, options={"state_bits": 8})
    verdict = "fits" if eight.total <= budget else "does NOT fit"
    assert f"with --opt state_bits=8: {eight.total / GIB:.2f} GiB, {verdict}" in tight.notes
    assert plan("llama-60m", "galore", rank=64, batch=8, seq=256, budget=base.total).notes == []


def test_switchlora_counts_its_candidate_pools_and_per_slice_steps():
    low = plan("tiny", "lowrank", rank=8, dtype="fp32", seq=64)
    sw = plan("tiny", "switchlora", rank=8, dtype="fp32", seq=64)
    h, f, r, layers = 256, 688, 8, 4
    shapes = [(h, h)] * 4 + [(f, h)] * 3
    frozen = sum(m * n + min(m, n) * (m + n) for m, n in shapes) * 4  # W and the two pools, fp32
    frozen += 7 * (4 * r + 2) * 8  # int64 slots, frozen counters (r each for A and B) and the two pointers
    assert sw.bytes["weights_frozen"] == low.bytes["weights_frozen"] + layers * frozen
    assert sw.bytes["weights_trainable"] == low.bytes["weights_trainable"]
    # per factor a float32 step per row of A / column of B in place of one scalar step
    assert sw.bytes["optimizer_state"] == low.bytes["optimizer_state"] + layers * 7 * 2 * (4 * r - 4)
