"""AdaLoRA against PEFT 0.21's (``AdaLoraConfig`` + ``update_and_allocate``): step for step over 40 steps with budget
allocations, the budget reaching its target, gradient accumulation, DDP, and PEFT's ADALORA files both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_helpers import logits, small_model, tokens

from rankwise import adapters, methods
from rankwise.adapters.adalora import AdaLoRA
from rankwise.errors import RankwiseError
from rankwise.methods import OptimConfig
from rankwise.train import lm_loss

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]  # 2 layers x 64x64, 64x64, 128x64 (in < out), 64x128 (in > out)
SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=8, deltaT=2, total_step=40, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5)
LR = 2e-2


def peft_model(base: torch.nn.Module, **overrides):
    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, lora_alpha=8, **{**SCHEDULE, **overrides})
    torch.manual_seed(0)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def ours(base: torch.nn.Module, **overrides):
    s = {**SCHEDULE, **overrides}
    method = methods.get("adalora", r=s.pop("init_r"), alpha=8.0, target=",".join(TARGETS),
                         delta_t=s.pop("deltaT"), **s)
    model = method.prepare(copy.deepcopy(base))
    return method, model


def layers(model) -> dict[str, AdaLoRA]:
    return {k.rsplit(".", 1)[0]: v for k, v in adapters.active_parameterizations(model).items()}


def peft_tensors(pm) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, p in pm.base_model.model.named_parameters():
        for key in ("lora_A", "lora_B", "lora_E"):
            if f".{key}.default" in name:
                out.setdefault(name.split(f".{key}.")[0], {})[key] = p
    return out


def copy_init(pm, model) -> None:
    with torch.no_grad():
        for path, tensors in peft_tensors(pm).items():
            for key, p in tensors.items():
                getattr(layers(model)[path], key).copy_(p)


def batch(step: int) -> torch.Tensor:
    return tokens(4, 17, seed=1000 + step)


@pytest.fixture(scope="module")
def trained():
    """PEFT and rankwise AdaLoRA trained side by side for 40 steps; per step: max weight difference, masks."""
    base = small_model()
    pm = peft_model(base)
    method, model = ours(base)
    copy_init(pm, model)
    p_opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    r_opt = method.build_optimizer(model, OptimConfig(lr=LR))
    diffs, kept, peft_kept = [], [], []
    for step in range(1, SCHEDULE["total_step"] + 1):
        x = batch(step)
        pm(input_ids=x, labels=x).loss.backward()
        p_opt.step()
        pm.base_model.update_and_allocate(step)
        p_opt.zero_grad()
        (lm_loss(model, x) + method.aux_loss(model)).backward()
        r_opt.step()  # the allocator runs in the optimizer's post-step hook
        r_opt.zero_grad()
        method.after_step(step, model, r_opt)
        ref = peft_tensors(pm)
        ls = layers(model)
        diffs.append(max((getattr(ls[p], k) - t).abs().max().item() for p, ts in ref.items() for k, t in ts.items()))
        kept.append({p: ls[p].rank_mask.tolist() for p in ls})
        pattern = pm.peft_config["default"].rank_pattern
        peft_kept.append(None if pattern is None else
                         {k.replace(".lora_E.default", "").removeprefix(""): v for k, v in pattern.items()})
    return dict(pm=pm, model=model, method=method, diffs=diffs, kept=kept, peft_kept=peft_kept, base=base)


def test_step_for_step_equal_to_peft_with_budget_allocation(trained):
    assert max(trained["diffs"]) <= 1e-5, trained["diffs"]
    allocated = 0
    for ours_kept, peft_kept in zip(trained["kept"], trained["peft_kept"]):
        if peft_kept is not None:
            allocated += 1
            assert ours_kept == {k.removesuffix(".lora_E"): v for k, v in peft_kept.items()}
    assert allocated >= 10  # allocations at every deltaT of the budgeting phase, then the final one
    counts = [sum(map(sum, k.values())) for k in trained["kept"]]
    assert counts[0] == 8 * 6 and min(counts) < counts[0]  # pruning happened during the run


def test_budget_follows_the_cubic_schedule_and_reaches_the_target(trained):
    method = trained["method"]
    alloc = method.allocator
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    counts = [sum(map(sum, k.values())) for k in trained["kept"]]
    for step in range(SCHEDULE["tinit"] + 1, final + 1):  # at each masking step, exactly the budget (no ties here)
        budget = int((48 - 24) * (1 - (step - 4) / (40 - 8 - 4)) ** 3 + 24)
        assert alloc.budget(step)[0] == budget
        if step % SCHEDULE["deltaT"] == 0 or step == final:
            assert counts[step - 1] == budget
    assert counts[final - 1:] == [SCHEDULE["target_r"] * 8] * (SCHEDULE["total_step"] - final + 1)
    # after the final allocation the pruned singular values stay zero
    for layer in layers(trained["model"]).values():
        assert (layer.lora_E[~layer.rank_mask] == 0).all()


def test_orthogonality_regularizer_equals_peft(trained):
    pm, model, method = trained["pm"], trained["model"], trained["method"]
    x = batch(0)
    with torch.no_grad():
        peft_total = pm(input_ids=x, labels=x).loss
        plain = lm_loss(model, x)
        assert (plain + method.aux_loss(model)).item() == pytest.approx(peft_total.item(), rel=1e-5)
        assert method.aux_loss(model).item() > 1e-3


def test_peft_loads_our_files_and_we_load_peft_files_with_equal_logits(trained, tmp_path):
    pm, model, base = trained["pm"], trained["model"], trained["base"]
    x = tokens(2, 16, seed=5)
    expected = logits(pm.eval(), x)
    adapters.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["target_r"] == 3
    assert sum(map(sum, config["rank_pattern"].values())) == 24
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert (logits(loaded, x) - expected).abs().max() <= 1e-5
    assert (logits(model.eval(), x) - expected).abs().max() <= 1e-5
    pm.save_pretrained(str(tmp_path / "peft"))
    ours_loaded = adapters.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert (logits(ours_loaded, x) - expected).abs().max() <= 1e-5
    assert (logits(ours_loaded, x) - logits(base, x)).abs().max() > 1e-3  # the adapter does something
    for path, layer in layers(ours_loaded).items():  # the file's rank_pattern is the loaded masks
        assert layer.rank_mask.tolist() == pm.peft_config["default"].rank_pattern[f"{path}.lora_E"]
    adapters.save_adapter(ours_loaded, tmp_path / "again")  # and it round-trips unchanged
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == config["rank_pattern"]


def test_unpruned_adapter_round_trips_without_rank_pattern(tmp_path):
    base = small_model()
    method, model = ours(base)
    with torch.no_grad():
        for layer in layers(model).values():
            layer.lora_E.normal_()
    adapters.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"] is None
    x = tokens(2, 16)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    assert (logits(loaded, x) - logits(model.eval(), x)).abs().max() <= 1e-5


def test_gradient_accumulation_updates_importance_once_per_optimizer_step():
    base = small_model()
    runs = []
    for micro in (1, 2):
        method, model = ours(base, total_step=12, tinit=2, tfinal=3, deltaT=1)
        opt = method.build_optimizer(model, OptimConfig(lr=LR))
        for step in range(1, 13):
            for part in batch(step).chunk(micro):
                ((lm_loss(model, part) + method.aux_loss(model)) / micro).backward()
            opt.step()
            opt.zero_grad()
            method.after_step(step, model, opt)
        runs.append(layers(model))
    for path, layer in runs[0].items():
        other = runs[1][path]
        assert torch.equal(layer.rank_mask, other.rank_mask)
        for key in ("lora_A", "lora_B", "lora_E"):
            assert (getattr(layer, key) - getattr(other, key)).abs().max() <= 1e-5


Q0 = "model.layers.0.self_attn.q_proj.lora_E"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(foo=1), "unknown field(s) foo"),
    (lambda c: c["rank_pattern"].update({"model.layers.0.mlp.gate_proj.lora_E": [True] * 6}),
     "names no adapted module"),
    (lambda c: c["rank_pattern"].update({Q0: c["rank_pattern"][Q0][:5]}), "list of init_r = 6 booleans"),
    (lambda c: c["rank_pattern"].update({Q0: [not b for b in c["rank_pattern"][Q0]]}), "rank_pattern keeps"),
    (lambda c: c.update(use_dora=True), "use_dora"),
    (lambda c: c.pop("init_r"), "lacks a valid 'init_r'"),
])
def test_bad_adalora_files_are_one_clear_error(trained, tmp_path, edit, message):
    adapters.save_adapter(trained["model"], tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    fresh = small_model()
    with pytest.raises(RankwiseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        adapters.load_adapter(fresh, tmp_path / "a")
    assert not adapters.adapter_layers(fresh)


def test_bad_schedules_are_refused():
    with pytest.raises(RankwiseError, match="no budgeting phase"):
        methods.get("adalora", tinit=10, tfinal=5, total_step=15)
    with pytest.raises(RankwiseError, match="target_r must be in"):
        methods.get("adalora", r=4, target_r=6, total_step=10)
