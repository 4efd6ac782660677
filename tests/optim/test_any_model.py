"""The presets on models that are not LLaMA: a plain MLP, GPT-2 (``Conv1D`` weights stored (in, out)), a params list."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim_helpers import single_thread  # noqa: F401 (autouse fixture)
from rankwise.errors import RankwiseError
from rankwise.optim import build


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).float()


def mlp_steps(model, opt, steps=6):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_galore_and_adamw_on_a_plain_mlp():
    """No attn / mlp names: every linear weight is projected; ``adamw`` is torch's AdamW."""
    model = mlp()
    opt = build("galore", model, rank=2, update_gap=2, lr=1e-2)
    losses = mlp_steps(model, opt)
    weights = [model[i].weight for i in (0, 2, 4)]
    assert all(opt.state[w]["basis"].shape == (min(w.shape), 2) for w in weights)
    assert losses[-1] < losses[0]

    ours, ref = mlp(), mlp()
    opt = build("adamw", ours, lr=1e-2, weight_decay=0.1)
    decay = [p for p in ref.parameters() if p.dim() == 2]
    rest = [p for p in ref.parameters() if p.dim() < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-2)
    mlp_steps(ours, opt)
    mlp_steps(ref, torch_opt)
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters())) < 1e-6


def test_targets_choose_the_projected_modules():
    model = mlp()
    opt = build("galore", model, rank=2, targets=["2"])
    assert [p for p in opt.param_groups[0]["params"]] == [model[2].weight]
    with pytest.raises(RankwiseError, match=r"no trainable linear layer .*Sequential.*'attn'.*targets"):
        build("galore", model, rank=2, targets=["attn"])


def test_gpt2_conv1d_weights_are_projected_and_trained():
    """GPT-2's attention / MLP ``Conv1D`` weights (in, out) are projected on their smaller side; embeddings, tied
    head and norms stay plain; BAdam blocks ``transformer.h.N.``."""
    model = gpt2()
    opt = build("galore", model, rank=4, update_gap=2, lr=1e-2)
    names = opt.param_groups[0]["names"]
    assert names == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    c_attn = model.transformer.h[0].attn.c_attn.weight  # (32, 96)
    assert c_attn.shape == (32, 96) and opt.state[c_attn]["basis"].shape == (32, 4)
    assert losses[-1] < losses[0]
    badam = build("badam", gpt2())
    assert sorted(badam.param_groups[0]["block_ids"]) == [0, 1]
    blocked = {n for g in badam.param_groups for n in g["names"]}
    assert "transformer.h.1.ln_1.weight" in blocked and not any(n.startswith("transformer.w") for n in blocked)


def test_a_params_list_is_accepted_and_errors_speak_the_api():
    model = mlp()
    opt = build("galore", model.parameters(), rank=2, lr=1e-2)
    losses = mlp_steps(model, opt)
    assert losses[-1] < losses[0] and all("basis" in opt.state[p] for p in model.parameters() if p.dim() == 2)
    with pytest.raises(RankwiseError, match=r"rank 8 is invalid for param #4 of shape \(3, 16\).*pass a smaller "
                                            r"rank, or put this parameter in a param group with project=False"):
        build("galore", mlp().parameters(), rank=8)
    with pytest.raises(RankwiseError, match="pass the model to build"):
        build("badam", mlp().parameters(), outside="train")
