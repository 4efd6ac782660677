"""Subspace refresh cost: our warm-started randomized SVD (``rsvd``) vs a full SVD (GaLore's refresh), and accuracy;
and (``--spike``) the step-time spike and peak-memory bump of refreshing every matrix at once vs ``stagger=True``.

    python benchmarks/optim_refresh.py            # GPU: 4096x4096 and 4096x11008, rank 128/256
    python benchmarks/optim_refresh.py --scale 4  # CPU: the same shapes / 4 (1024x1024, 1024x2752, rank 32/64)
    python benchmarks/optim_refresh.py --spike --model tiny --method galore --rank 64 --gap 10 --steps 41 --cpu-time

``--spike`` trains two identical models side by side in one process, steps interleaved (the same machine load on
both), one with the preset's refresh of every matrix each ``--gap`` steps, one with ``stagger=True``; per whole
training step (forward + backward + step) it records the time and the peak memory above the step's start
(CUDA: exact allocator peak; CPU: sampled RSS, approximate). Reported, excluding update 0 (where both refresh
everything: no basis yet): mean, median and max step time, spike = max / median, the mean of the all-at-once refresh steps / median, and
peak-memory median / max / bump (max - median).

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


def spike(args: argparse.Namespace, device: torch.device) -> None:
    from rankwise.metrics import PeakMemory
    from rankwise.models import build_model
    from rankwise.optim import build

    clock = time.thread_time if args.cpu_time else time.perf_counter
    runs = {}
    for stagger in (False, True):
        model = build_model(args.model, seed=0).to(device)
        opt = build(args.method, model, rank=args.rank, update_gap=args.gap, lr=1e-3, stagger=stagger)
        runs[stagger] = (model, opt, [], [])
    vocab = runs[False][0].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
        for model, opt, times, peaks in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            with PeakMemory(device) as mem:
                start = clock()
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(clock() - start)
            peaks.append(mem.peak)
    print(f"device {device}, {args.model}, {args.method} rank {args.rank}, gap {args.gap}, {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len}, {'thread CPU' if args.cpu_time else 'wall'} time, update 0 excluded")
    print("| refresh | mean step s | median step s | max step s | spike (max / median) | refresh steps / median | "
          "peak MiB median | max | bump |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stagger, (_, _, times, peaks) in runs.items():
        t, m = times[1:], [b / 2**20 for b in peaks[1:]]
        med = statistics.median(t)
        at_refresh = statistics.mean(t[k - 1] for k in range(args.gap, args.steps, args.gap))
        print(f"| {'staggered' if stagger else 'all at once'} | {statistics.mean(t):.4f} | {med:.4f} | {max(t):.4f} | {max(t) / med:.2f}x | "
              f"{at_refresh / med:.2f}x | {statistics.median(m):.1f} | {max(m):.1f} | "
              f"{max(m) - statistics.median(m):.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=None, help="divide shapes and ranks by this (default: 1 on GPU, 4 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--spike", action="store_true", help="step-time spike of refreshes: all at once vs stagger=True")
    ap.add_argument("--model", default="tiny", help="--spike: model preset")
    ap.add_argument("--method", default="galore", help="--spike: optimizer preset (galore, fira, apollo, ...)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gap", type=int, default=10, help="--spike: update gap")
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--cpu-time", action="store_true", help="--spike: time steps by thread CPU time (loaded machines)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.spike:
        spike(args, device)
        return
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
