"""Subspace refresh cost: our warm-started randomized SVD (``rsvd``) vs a full SVD (GaLore's refresh), and accuracy.

    python benchmarks/optim_refresh.py            # GPU: 4096x4096 and 4096x11008, rank 128/256
    python benchmarks/optim_refresh.py --scale 4  # CPU: the same shapes / 4 (1024x1024, 1024x2752, rank 32/64)

The matrix is a synthetic "gradient" with a decaying spectrum (s_k = k^-1) plus a slowly rotated copy for the
warm start (the situation at a refresh: the previous basis is close). Reports median seconds over repeats,
the ratio svd / rsvd, and the gradient energy the rsvd basis captures relative to the optimal (SVD) basis,
||P^T G||_F^2 / ||U_r^T G||_F^2 (with s_k = 1/k neighbouring singular values are close, so the subspace itself is
ill-determined; the captured energy is what matters for the update).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankwise.optim.projectors import make_projector


def synthetic(m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, device=device, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, device=device, generator=g)).Q
    s = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)
    return (u * s) @ v.t()


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=None, help="divide shapes and ranks by this (default: 1 on GPU, 4 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--power-iters", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale or (1 if device.type == "cuda" else 4)
    print(f"device {device}, shapes / {scale}, power_iters {args.power_iters}, median of {args.repeats}")
    print("| shape | rank | full SVD s | rsvd s | svd / rsvd | energy captured vs SVD |")
    print("|---|---|---|---|---|---|")
    for m, n in ((4096, 4096), (4096, 11008)):
        m, n = m // scale, n // scale
        a = synthetic(m, n, device)
        drift = torch.linalg.matrix_exp(0.01 * (lambda x: x - x.t())(torch.randn(m, m, device=device)))
        b = drift @ a  # the next refresh's gradient: slightly rotated
        for rank in (128 // scale, 256 // scale):
            svd, rsvd = make_projector("svd", rank), make_projector("rsvd", rank, power_iters=args.power_iters)
            warm: dict = {}
            rsvd.fit(a, warm, seed=0)  # the previous refresh
            t_svd = timed(lambda: svd.fit(b, {}, 0), args.repeats, device)
            t_rsvd = timed(lambda: rsvd.fit(b, dict(warm), 1), args.repeats, device)
            exact, approx = {}, dict(warm)
            svd.fit(b, exact, 0)
            rsvd.fit(b, approx, 1)
            energy = ((approx["basis"].t() @ b).norm() / (exact["basis"].t() @ b).norm()).item() ** 2
            print(f"| {m}x{n} | {rank} | {t_svd:.3f} | {t_rsvd:.4f} | {t_svd / t_rsvd:.1f}x | {energy:.6f} |",
                  flush=True)


if __name__ == "__main__":
    main()
