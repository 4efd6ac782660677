"""Low-bit optimizer state (``state_bits``) against the libraries' own low-bit optimizers, step for step (issue 14).

- 8-bit: rankwise's AdamW / Adam / SGD-momentum with ``state_bits=8`` vs bitsandbytes' ``AdamW8bit`` / ``Adam8bit``
  / ``SGD8bit`` (blockwise, its CPU kernels): the same weights and the *same codes* after 30 steps;
- 4-bit: vs torchao's ``AdamW4bit`` (its step run eagerly: ``torch.compile`` needs a C++ toolchain on CPU);
- the ``galore-8bit`` preset vs galore-torch 1.0's ``GaLoreAdamW8bit`` on a LLaMA with square and rectangular
  matrices, 30 steps, a refresh every 5. Teacher-forced twice over: after every step our weights *and* moments
  (codes, absmax) are set to the reference's, so each step starts from identical state and one rounding-level
  difference cannot flip a code that then persists (it changes a moment by one quantization step, 1e-3 to 1e-2
  of its block's absmax, and weights by up to lr times that).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ref_lowrank import reference_groups
from ref_model import batches, loss_of
from rankwise.optim import SplitOptimizer, build

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

STEPS, LR = 30, 1e-3


def run(make, steps: int = STEPS):
    """A 64x128 matrix and a 128 bias (small: fp32 state on both sides), fixed gradients."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(128))
    opt, g = make([w, b]), torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad, b.grad = torch.randn(w.shape, generator=g), torch.randn(b.shape, generator=g)
        opt.step()
    return w.detach(), b.detach(), opt.state[w]


@pytest.mark.parametrize("inner,reference,options", [
    ("adamw", "AdamW8bit", {"weight_decay": 0.1}),
    ("adam", "Adam8bit", {}),  # bitsandbytes' 8-bit Adam decays like AdamW: no decay here
    ("sgd", "SGD8bit", {"momentum": 0.9}),
])
def test_8bit_state_equals_bitsandbytes(inner, reference, options):
    ours = run(lambda ps: SplitOptimizer(ps, project=False, inner=inner, state_bits=8, lr=LR, **options))
    ref = run(lambda ps: getattr(bnb.optim, reference)(ps, lr=LR, **options))
    assert (ours[0] - ref[0]).abs().max() <= 1e-6 and (ours[1] - ref[1]).abs().max() <= 1e-6
    start = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    assert (ours[0] - start).abs().max() > 1e-3  # it moved
    keys = ("exp_avg", "exp_avg_sq") if inner != "sgd" else ("momentum_buffer",)
    for k, (codes, absmax) in zip(keys, (("state1", "absmax1"), ("state2", "absmax2"))):
        assert ours[2][k].dtype == torch.uint8 and torch.equal(ours[2][k], ref[2][codes])
        assert torch.allclose(ours[2][f"{k}.absmax8"], ref[2][absmax], rtol=1e-6, atol=0)


def test_4bit_state_equals_torchao(monkeypatch):
    from torchao.optim import AdamW4bit

    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)  # torchao's own step function, eagerly
    ours = run(lambda ps: SplitOptimizer(ps, project=False, state_bits=4, lr=LR, weight_decay=0.1))
    ref = run(lambda ps: AdamW4bit(ps, lr=LR, weight_decay=0.1))
    assert (ours[0] - ref[0]).abs().max() <= 1e-4  # lerp vs mul+addcmul for v flip a rare 4-bit code
    assert (ours[0] - ref[0]).abs().max() < (ours[0] - run(lambda ps: torch.optim.AdamW(
        ps, lr=LR, weight_decay=0.1))[0]).abs().max() / 20  # far closer to torchao's 4-bit than to fp32 AdamW
    for k in ("exp_avg", "exp_avg_sq"):
        same = (ours[2][k].view(-1) == ref[2][k].codes.view(-1)).float().mean()
        assert same >= 0.999


def llama():
    """One layer: square q/o (128x128), k/v 64x128 (m < n), gate/up 320x128 (m > n), down 128x320; rank 32 puts every
    projected moment at >= 4096 entries (quantized); norms stay fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def test_galore_8bit_preset_matches_galore_torch_step_for_step(monkeypatch):
    galore_torch = pytest.importorskip("galore_torch")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: None)  # GaLoreAdamW8bit syncs after each param
    rank, gap = 32, 5
    ours, ref = llama(), llama()
    opt = build("galore-8bit", ours, rank=rank, update_gap=gap, lr=2e-3)
    opt_ref = galore_torch.GaLoreAdamW8bit(reference_groups(ref, 0.0, rank=rank, update_proj_gap=gap, scale=0.25,
                                                            proj_type="std"), lr=2e-3, weight_decay=0.0)
    start = copy.deepcopy(ref)
    trace, same_codes, quantized = [], [], 0
    for batch in batches(STEPS):
        for m, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=True)
            loss_of(m, batch).backward()
            o.step()
        with torch.no_grad():
            trace.append(max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters())))
            for a, b in zip(ours.parameters(), ref.parameters()):
                mine, theirs = opt.state[a], opt_ref.state[b]
                for k, n in (("exp_avg", "1"), ("exp_avg_sq", "2")):
                    if f"absmax{n}" in theirs:  # quantized on both sides: compare and adopt the reference's codes
                        quantized += 1
                        same_codes.append((mine[k] == theirs[f"state{n}"]).float().mean().item())
                        mine[k], mine[f"{k}.absmax8"] = theirs[f"state{n}"].clone(), theirs[f"absmax{n}"].clone()
                    else:
                        assert f"{k}.absmax8" not in mine and mine[k].dtype == torch.float32
                        assert mine[k].shape == theirs[f"state{n}"].shape  # 1-D norms
                        mine[k] = theirs[f"state{n}"].clone()
                a.copy_(b)
    assert quantized == 2 * STEPS * 9  # 7 projected matrices + embeddings + head, each step
    assert max(trace) <= 1e-5, f"max |dW| per step: {trace}"
    assert min(same_codes) >= 0.999
    assert max((a - b).abs().max().item() for a, b in zip(ref.parameters(), start.parameters())) > 1e-2
