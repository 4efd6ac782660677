"""Low-bit optimizer state (``state_bits``, ``rankwise.optim.lowbit``): the codec against an oracle of its definition,
exact state bytes, bit-exact resume, refresh policies on quantized moments, quality close to the 32-bit state.
Step-for-step equality with bitsandbytes / torchao / galore-torch: tests/reference/test_ref_lowbit.py."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch

from optim_helpers import max_diff, train_steps, single_thread  # noqa: F401 (autouse fixture)
from rankwise.errors import RankwiseError
from rankwise.metrics import optimizer_state_bytes
from rankwise.models import build_model
from rankwise.optim import SplitOptimizer, build, lowbit, param_groups

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")


def model(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 1) -> torch.nn.Module:
    """One layer, hidden 64, FFN 160, vocab 128: q/k/v/o 64x64, gate/up 160x64 (m > n), down 64x160, embeddings and
    head 128x64. At rank 32 gate/up/down's moments (32 x 160 = 5120 entries) and the plain embeddings / head (8192)
    are quantized; q/k/v/o's (2048) and the norms stay fp32."""
    return build_model("tiny", vocab_size=128, seed=seed, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64).to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_codec_is_blockwise_absmax_and_nearest_map_value(bits, signed):
    """x ~= s_b q[c]: s_b = max |x| over each block of B entries, c the map entry nearest to x / s_b (bitsandbytes'
    CPU kernel rounds within 3e-5 of a midpoint either way; torchao's 4-bit exactly)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g) * torch.logspace(-4, 0, 256)  # entries across four decades
    x = x if signed else x.square()
    codes, absmax = lowbit.encode(x, bits, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() * bits // 8
    y = lowbit.decode(codes, absmax, bits, signed)
    block = lowbit.BLOCK[bits]
    xs, ys = x.view(-1, block), y.view(-1, block)
    scale = xs.abs().amax(1, keepdim=True)
    assert torch.equal(absmax, scale.view(-1))
    qmap = lowbit._map(bits, signed, x.device)
    assert len(qmap) == 2 ** bits and bool((qmap[1:] > qmap[:-1]).all())
    nearest = (xs / scale).unsqueeze(-1).sub(qmap).abs().min(-1).values
    excess = (ys / scale - xs / scale).abs() - nearest
    assert excess.max() <= (5e-5 if bits == 8 else 1e-6)
    # decoded values are map values times the block scale; the error is at most the map's covering radius of
    # [-1, 1] ([0, 1] unsigned: torchao's 4-bit map has no zero, so it is 1/16 there)
    assert torch.allclose((ys / scale).unsqueeze(-1).sub(qmap).abs().min(-1).values, torch.zeros(()), atol=1e-6)
    radius = max(qmap.diff().max() / 2, qmap[0] - (-1 if signed else 0), 1 - qmap[-1])
    assert ((ys - xs).abs() <= scale * (radius + 5e-5)).all()
    if bits == 8:
        assert ((ys - xs).abs() <= scale * 0.008).all()  # the dynamic map's largest half-gap is 0.0071


def moment_bytes(n: int, bits: int) -> int:
    """An independent closed form: codes + fp32 absmax per block when >= 4096 entries, else fp32."""
    if n < 4096:
        return 4 * n
    return n + 4 * math.ceil(n / 256) if bits == 8 else n // 2 + 4 * (n // 128)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("preset,options", [
    ("galore", {"rank": 32, "update_gap": 2}), ("galore", {"rank": 32, "update_gap": 2, "projector": "random"}),
    ("adamw", {}), ("split", {"rank": 32, "update_gap": 2, "inner": "sgd"}),
    ("frugal", {"projector": "columns", "density": None, "rank": 32, "update_gap": 2}),
    ("frugal", {"update_gap": 2}),
])
def test_state_bytes_measured_equal_expected_and_closed_form(preset, options, bits):
    m = model()
    opt = build(preset, m, state_bits=bits, **options)
    train_steps(m, opt, range(3))  # across a refresh
    assert optimizer_state_bytes(opt) == opt.expected_state_bytes(2)
    if preset in ("galore", "adamw", "split"):
        k = 1 if options.get("inner") == "sgd" else 2
        groups = param_groups(m) if preset != "adamw" else [{"params": list(m.parameters()), "project": False}]
        total = 0
        for g in groups:
            for p in g["params"]:
                if g.get("project", True):
                    basis = 0 if options.get("projector") == "random" else 32 * min(p.shape) * 4
                    total += basis + k * moment_bytes(32 * max(p.shape), bits) + 4
                else:
                    total += k * moment_bytes(p.numel(), bits) + 4
        assert optimizer_state_bytes(opt) == total
    scales = [(s, key) for s in opt.state.values() for key in s if lowbit.is_scale(key)]
    assert scales and all(s[key.split(".")[0]].dtype == torch.uint8 and key.endswith(str(bits)) for s, key in scales)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{"moments": "keep"}, {"moments": "rotate"}, {"moments": "reset"},
                                     {"projector": "block", "moments": "reset", "residual": "signsgd"}])
def test_state_dict_round_trip_resumes_bit_exactly(bits, dtype, options):
    """Codes (uint8), absmax and the small moments (fp32 even for a bf16 model) survive torch.save / load."""
    opts = {"projector": "svd", "rank": 32, "update_gap": 3, "state_bits": bits, "lr": 1e-2, **options}
    straight = model(dtype=dtype)
    opt = SplitOptimizer(straight.parameters(), **opts)
    train_steps(straight, opt, range(7))
    first = model(dtype=dtype)
    opt1 = SplitOptimizer(first.parameters(), **opts)
    train_steps(first, opt1, range(4))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = model(dtype=dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = SplitOptimizer(resumed.parameters(), **opts)
    opt2.load_state_dict(saved["opt"])
    for key, value in opt2.state[next(iter(resumed.parameters()))].items():  # embeddings: quantized
        if torch.is_tensor(value):
            assert value.dtype == opt1.state[next(iter(first.parameters()))][key].dtype
    train_steps(resumed, opt2, range(4, 7))
    assert max_diff(straight, resumed) == 0.0


@pytest.mark.parametrize("options", [{"moments": "keep"}, {"moments": "rotate"}, {"moments": "reset"}])
def test_8bit_galore_tracks_32bit_state_across_refreshes(options):
    """The same optimizer with 8-bit and with fp32 moments: refreshes with kept, rotated or reset moments."""
    runs = {}
    for bits in (None, 8):
        m = model()
        opt = build("galore", m, rank=32, update_gap=4, lr=3e-3, state_bits=bits, **options)
        runs[bits] = m, train_steps(m, opt, range(12))
    (m32, loss32), (m8, loss8) = runs[None], runs[8]
    assert max(abs(a - b) for a, b in zip(loss32, loss8)) < 0.01
    assert relative_gap(m8, m32, model()) < 0.15  # measured 0.08 (keep), 0.02 (rotate), 0.03 (reset)


def test_frozen_block_keeps_its_codes_and_reset_frees_them():
    """LISA (keep): a frozen layer's quantized moments stay bit-identical; FRUGAL (reset): an inactive tensor's
    moments are freed with their absmax, and the bytes are the closed form of the selection."""
    m = model(layers=2)
    opt = build("lisa", m, update_gap=1, active_blocks=1, state_bits=8, lr=1e-3)
    checked = 0
    for step in range(6):
        before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
                  for p in m.parameters() if p in opt.state}
        train_steps(m, opt, range(step, step + 1))
        for p, (w, state) in before.items():
            if torch.equal(p, w):  # frozen this step
                assert state.keys() == {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
                assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())
                checked += any(lowbit.is_scale(k) for k in state)
    assert checked > 0
    m2 = model()
    reset = build("frugal", m2, update_gap=2, state_bits=8, density=0.5)
    train_steps(m2, reset, range(5))
    for s in reset.state.values():
        assert all(k.split(".")[0] in s for k in s if lowbit.is_scale(k))  # no orphan absmax
    assert optimizer_state_bytes(reset) == reset.expected_state_bytes(2)


def relative_gap(a: torch.nn.Module, b: torch.nn.Module, init: torch.nn.Module) -> float:
    """||W_a - W_b|| / ||W_b - W_0|| over all weights: how far apart two runs' total updates are, relatively."""
    num = sum((p - q).double().square().sum() for p, q in zip(a.parameters(), b.parameters()))
    den = sum((q - w).double().square().sum() for q, w in zip(b.parameters(), init.parameters()))
    return (num / den).sqrt().item()


def test_8bit_adamw_on_plain_params_tracks_fp32_adamw():
    runs = {}
    for bits in (None, 8):
        m = model()
        runs[bits] = m, train_steps(m, build("adamw", m, lr=3e-3, state_bits=bits), range(20))
    assert max(abs(a - b) for a, b in zip(runs[None][1], runs[8][1])) < 0.01
    assert relative_gap(runs[8][0], runs[None][0], model()) < 0.1


@pytest.mark.slow
def test_galore_8bit_loss_on_the_corpus_stays_close_to_32bit(corpus):
    """galore-8bit vs the same optimizer with fp32 moments (``galore`` with torch's AdamW arithmetic, eps 1e-8) on
    the embedded corpus (the tiny bench's ``mini`` model, 50 steps, refreshes every 20): final eval loss within
    0.05."""
    from rankwise_testing import quick_config

    from rankwise.train import train

    final = {}
    for bits, method, options in ((8, "galore-8bit", {}), (None, "galore", {"inner": "adamw", "eps": 1e-8})):
        res = train(quick_config(method=method, method_options={"rank": 32, "update_gap": 20, **options},
                                 preset="mini", steps=50, batch_size=4, seq_len=64, lr=3e-3, eval_batches=4),
                    corpus=corpus)
        final[bits] = res.metrics["final_eval_loss"]
        assert res.metrics["final_eval_loss"] < res.metrics["initial_eval_loss"] - 0.5
        assert res.metrics["optimizer_state_bytes"] == res.optimizer.expected_state_bytes()
        assert res.optimizer.param_groups[0]["state_bits"] == bits
    assert abs(final[8] - final[None]) < 0.05


def test_state_bits_errors(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(64, 64))]
    with pytest.raises(RankwiseError, match="state_bits must be 8, 4 or None"):
        SplitOptimizer(p, state_bits=16)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(RankwiseError, match=r"rankwise\[lowbit\]"):
        SplitOptimizer(p, state_bits=8)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    monkeypatch.setitem(sys.modules, "torchao.optim.quant_utils", None)
    with pytest.raises(RankwiseError, match=r"rankwise\[lowbit\]"):
        SplitOptimizer(p, state_bits=4)


def test_meta_device_state_has_the_real_bytes():
    """The planner's meta step quantizes too (bitsandbytes' and torchao's ops have meta kernels)."""
    m = model()
    real = build("galore-8bit", m, rank=32, lr=1e-3)
    train_steps(m, real, range(1))
    mm = model().to("meta")
    meta = build("galore-8bit", mm, rank=32, lr=1e-3)
    for p in mm.parameters():
        p.grad = torch.zeros_like(p)
    meta.step()
    assert optimizer_state_bytes(meta) == optimizer_state_bytes(real) == real.expected_state_bytes()
