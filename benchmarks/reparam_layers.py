"""Speed and saved-activation memory of the weight-space layers, as ratios against anchors in the same process.

    python benchmarks/reparam_layers.py --tokens 2048 --dim 1024 --ffn 2736 --rank 256 --repeats 7

Rows (median of repeats, forward + backward of one layer, bf16 autocast on CPU unless --fp32):
- SLTrain (ours: custom autograd, dense W rebuilt in backward) vs the same maths with plain autograd (dense W saved)
  and vs a dense ``nn.Linear``: time ratio and bytes saved for backward.
- SST (ours: custom autograd, saves only the input) vs ``U diag(sigma) V^T`` under plain autograd; LOST.
- low-rank ``W = B A`` and ReLoRA vs dense ``nn.Linear``.
- ``refactorize`` (QR + r x r SVD, batched) vs a full SVD of the m x n product ``B A``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.reparam import (ChannelSparseLowRankLinear, LowRankLinear, ReLoRALinear, SparseLowRankLinear,
                              SpectralLinear, refactorize)


class NaiveSparseLowRank(nn.Module):
    """The anchor: ``F.linear(x, scale B A + S)`` differentiated by autograd (saves the dense W)."""

    def __init__(self, ours: SparseLowRankLinear):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        o = self.ours
        w = (o.lora_B @ o.lora_A) * o.scale
        w = w.flatten().index_add(0, o.sparse_indices, o.sparse_values.to(w.dtype)).view_as(w)
        return F.linear(x, w)


class NaiveSpectral(nn.Module):
    """SST's maths under plain autograd: ``F.linear(x, [U, U_f] diag(sigma[perm]) [V, V_f]^T)``."""

    def __init__(self, ours: SpectralLinear):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        o = self.ours
        U, V = torch.cat([o.U, o.U_frozen], 1), torch.cat([o.V, o.V_frozen], 1)
        return F.linear(x, (U * o.sigma[o.perm]) @ V.t())


def measure(layer: nn.Module, x: torch.Tensor, repeats: int, autocast: bool) -> tuple[float, int]:
    """Median seconds of forward + backward, and bytes saved for backward by the forward pass (tensors that are
    the layer's own parameters or the input cost nothing extra and are not counted)."""
    saved = []
    free = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in free:
            saved.append(t.numel() * t.element_size())
        return t

    times = []
    for i in range(repeats + 1):
        saved.clear()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = layer(x)
        out.float().sum().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    return statistics.median(times), sum(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2736)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fp32", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    autocast = not args.fp32
    x = torch.randn(args.tokens, args.dim, requires_grad=True)  # an inner layer: the input needs its gradient
    dense = nn.Linear(args.dim, args.ffn, bias=False)
    sl = SparseLowRankLinear(args.dim, args.ffn, args.rank, args.density)
    with torch.no_grad():
        sl.lora_B.normal_(0, 0.02)
    layers = {"dense nn.Linear": dense, "sltrain (ours)": sl, "sltrain (plain autograd)": NaiveSparseLowRank(sl),
              "lowrank B A": LowRankLinear(args.dim, args.ffn, args.rank),
              "relora W + B A": ReLoRALinear(dense, args.rank)}
    sst = SpectralLinear(dense.weight, None, args.rank)
    layers.update({"sst (ours)": sst, "sst (plain autograd)": NaiveSpectral(sst),
                   "lost": ChannelSparseLowRankLinear(dense.weight, None, args.rank)})
    results = {name: measure(layer, x, args.repeats, autocast) for name, layer in layers.items()}
    base_t, base_b = results["dense nn.Linear"]
    naive_t, naive_b = results["sltrain (plain autograd)"]
    print(f"one {args.ffn} x {args.dim} layer, {args.tokens} tokens, rank {args.rank}, density {args.density}, "
          f"{'bf16 autocast' if autocast else 'fp32'}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| layer | fwd+bwd ms | vs dense | vs plain-autograd SLTrain | extra saved for backward MiB |")
    print("|---|---|---|---|---|")
    for name, (t, b) in results.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / base_t:.2f}x | {t / naive_t:.2f}x | {b / 2**20:.1f} |")
    print(f"SLTrain saved-for-backward bytes, ours / plain autograd: {results['sltrain (ours)'][1] / naive_b:.3f}")
    ours_t, ours_b = results["sst (ours)"]
    plain_t, plain_b = results["sst (plain autograd)"]
    print(f"SST ours / plain autograd: time {ours_t / plain_t:.2f}x, saved-for-backward bytes "
          f"{ours_b / max(plain_b, 1):.3f}")

    # refactorization: 7 projections per block in one call vs a full SVD of each m x n product
    pairs = [(torch.randn(args.ffn, args.rank), torch.randn(args.rank, args.dim)) for _ in range(4)]
    t_ours, t_full = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        refactorize([(b.clone(), a.clone()) for b, a in pairs])
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        for b, a in pairs:
            u, s, vh = torch.linalg.svd((b.double() @ a.double()), full_matrices=False)
            r = args.rank
            _ = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        t_full.append(time.perf_counter() - start)
    ours, full = statistics.median(t_ours), statistics.median(t_full)
    print(f"refactorize 4 pairs ({args.ffn}x{args.rank} @ {args.rank}x{args.dim}): ours {ours * 1e3:.1f} ms, "
          f"full SVD of B A {full * 1e3:.1f} ms, speed-up {full / ours:.1f}x")


if __name__ == "__main__":
    main()
