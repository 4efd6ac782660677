"""The frozen quantized base (``rankwise.quant``): NF4 / int8 against independent implementations of their
definitions, adapters on top, state round trips, the planner's real bytes, bad input."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import small_model, tokens

from rankwise import adapters, methods, quant
from rankwise.errors import RankwiseError
from rankwise.methods import OptimConfig
from rankwise.plan import breakdown, held_gradient_bytes, plan
from rankwise.train import lm_loss

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E; bitsandbytes/functional.py ``get_4bit_type("nf4")``)
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def test_nf4_is_blockwise_absmax_onto_the_code_book():
    """Oracle (QLoRA eq. 1-2): per block of 64, ``deq = c_k * a'`` with ``c_k`` the code value nearest to ``w / a``,
    ``a`` the block absmax and ``a'`` its int8 double-quantized copy."""
    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(0)) * 0.02
    deq = quant.dequantize(quant.quantize_tensor(w, "nf4"), torch.float32)
    blocks, dblocks = w.reshape(-1, 64), deq.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    scale = dblocks.abs().amax(1, keepdim=True)   # +-1 is in the code book: the block's largest |deq| is its scale
    assert torch.allclose(scale, absmax, rtol=2e-2)  # the scales' own int8 double quantization
    codes = dblocks / scale
    nearest = NF4_CODE[(codes[..., None] - NF4_CODE).abs().argmin(-1)]
    assert torch.allclose(codes, nearest, atol=1e-3)  # every value lies on the code book
    x = blocks / absmax
    want = (x.unsqueeze(-1) - NF4_CODE).abs().argmin(-1)
    got = (codes.unsqueeze(-1) - NF4_CODE).abs().argmin(-1)
    # it is the nearest one (torchao stores the code book to 4 decimals: only near-ties may pick the neighbour)
    tie_gap = (x - NF4_CODE[got]).abs() - (x - NF4_CODE[want]).abs()
    assert (want != got).float().mean() < 1e-3 and tie_gap.max() < 1e-4


def test_int8_is_symmetric_per_row_absmax():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    deq = quant.dequantize(quant.quantize_tensor(w, "int8"), torch.float32)
    s = w.abs().amax(1, keepdim=True) / 127.5  # torchao's symmetric scale: absmax / ((q_max - q_min) / 2)
    q = deq / s
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 128
    assert ((deq - w).abs() <= s / 2 + 1e-6).all()


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantized_linear_forward_and_backward_use_the_dequantized_weight(scheme):
    lin = torch.nn.Linear(128, 64)
    q = quant.QuantizedLinear(lin, scheme)
    w = quant.dequantize(q.weight, torch.float32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, F.linear(x, w, lin.bias), atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, atol=1e-5)
    assert not q.weight.requires_grad and q.weight.grad is None


@pytest.mark.parametrize("kind", ["lora", "nola", "vera", "randlora", "lora-xs"])
@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_every_adapter_trains_on_a_quantized_base(kind, scheme):
    """On the quantized base, the adapted model is the dense model ``deq(Q) + Delta W``; only adapters get grads."""
    model = adapters.apply(small_model(), kind, r=4, alpha=8, target="all-linear")
    quant.quantize_base(model, scheme)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    dense = quant.dequantize_base(copy.deepcopy(model))
    assert not quant.quantized_layers(dense) and len(quant.quantized_layers(model)) == 14
    x = tokens(vocab=512)
    assert torch.allclose(model(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-5)
    lm_loss(model, torch.cat([x, x[:, :1]], 1)).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n for n in grads)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_state_dict_round_trips_and_dense_weights_are_quantized_on_load(scheme):
    model = quant.quantize_base(adapters.apply(small_model(), "lora", r=4, target="all-linear"), scheme)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = quant.quantize_base(adapters.apply(small_model(seed=5), "lora", r=4, target="all-linear"), scheme)
    other.load_state_dict(torch.load(buf, weights_only=False))
    x = tokens(vocab=512)
    assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)
    dense = adapters.apply(small_model(), "lora", r=4, target="all-linear").state_dict()
    other.load_state_dict(dense)  # a full-precision checkpoint is quantized into the layers
    assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_planned_bytes_equal_measured_on_a_quantized_base(scheme):
    method = methods.get("lora", rank=8)
    from rankwise.models import build_model

    model = quant.quantize_method_base(method.prepare(build_model("tiny", seed=0)), method, scheme)
    optimizer = method.build_optimizer(model, OptimConfig())
    batch = torch.randint(0, 8192, (2, 17))
    lm_loss(model, batch).backward()
    gradients = held_gradient_bytes(model)
    optimizer.step()
    measured = {**breakdown(model, optimizer), "gradients": gradients}
    planned = plan("tiny", "lora", rank=8, batch=2, seq=16, dtype="fp32", quantize=scheme)
    assert {k: planned.bytes[k] for k in measured} == measured
    full = plan("tiny", "lora", rank=8, batch=2, seq=16, dtype="bf16")
    bits = {"nf4": 4, "int8": 8}[scheme]
    linear = sum(m.weight.numel() for m in quant.quantized_layers(model).values())
    # the quantized layers' bytes: bits/8 per weight plus a small overhead of scales (measured: < 4% for nf4)
    small = plan("tiny", "lora", rank=8, batch=2, seq=16, dtype="bf16", quantize=scheme)
    saved = full.bytes["weights_frozen"] - small.bytes["weights_frozen"]
    assert linear * (2 - bits / 8) * 0.95 < saved < linear * (2 - bits / 8)


def test_bad_input_is_one_clear_error(monkeypatch):
    with pytest.raises(RankwiseError, match="adapter method"):
        quant.quantize_method_base(small_model(), methods.get("full"), "nf4")
    with pytest.raises(RankwiseError, match="no frozen linear"):
        quant.quantize_base(small_model().requires_grad_(True), "nf4")
    with pytest.raises(RankwiseError, match="blocks of 64"):
        quant.QuantizedLinear(torch.nn.Linear(10, 3), "nf4")
    with pytest.raises(RankwiseError, match="fp32, bf16 or fp16"):
        quant.QuantizedLinear(torch.nn.Linear(64, 64).double(), "int8")
    with pytest.raises(RankwiseError, match="valid: nf4, int8"):
        quant.check_scheme("nf3")
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(RankwiseError, match=r"rankwise\[quant\]"):
        quant.quantize_base(adapters.apply(small_model(), "lora", r=4), "nf4")


def test_bf16_autocast_matches_the_dense_layer_forward_and_backward():
    q = quant.QuantizedLinear(torch.nn.Linear(128, 64), "nf4")
    dense = q.dense(torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    xd = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yd = q(x), dense(xd)
    assert y.dtype == yd.dtype == torch.bfloat16  # bias added after the matmul: one bf16 rounding apart
    assert torch.allclose(y.float(), yd.float(), rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    yd.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.allclose(x.grad, xd.grad, rtol=1e-2, atol=1e-3)
