"""SMoRA / MixLoRA / FlyLoRA forward+backward time vs plain LoRA at equal *active* rank, same process, interleaved
repeats, median. Two levels: one adapted linear layer (base GEMM included), and the whole tiny model with adapters on
every linear layer. The target in the issue: SMoRA <= 1.3x LoRA.

    python benchmarks/moe_speed.py [--tokens 2048] [--dim 1024] [--rank 64] [--active 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from rankwise import adapters
from rankwise.adapters.moe import layers  # noqa: F401  (registers smora / mixlora / flylora)
from rankwise.models import build_model


def variants(rank: int, active: int) -> dict[str, tuple[str, dict]]:
    return {
        f"lora r={active}": ("lora", {"r": active}),
        "smora masked": ("smora", {"r": rank, "top_k": active, "path": "masked"}),
        "smora gathered": ("smora", {"r": rank, "top_k": active, "path": "gathered"}),
        "mixlora masked": ("mixlora", {"r": active // 2, "num_experts": 2 * rank // active, "top_k": 2}),
        "flylora masked": ("flylora", {"r": rank, "top_k": active, "path": "masked"}),
        "flylora gathered": ("flylora", {"r": rank, "top_k": active, "path": "gathered"}),
    }


def time_fwd_bwd(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench(builders: dict[str, callable], repeats: int) -> dict[str, float]:
    steps = {name: build() for name, build in builders.items()}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so load changes hit every variant alike
        for name, step in steps.items():
            times[name] += time_fwd_bwd(step, 1)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_step(dim: int, tokens: int, method: str, options: dict):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(dim, dim))
        adapters.apply(model, method, alpha=16.0, target=["proj"], **options)
        x = torch.randn(tokens, dim, requires_grad=True)
        return lambda: model(x).sum().backward()
    return build


def model_step(tokens: int, method: str, options: dict):
    def build():
        model = build_model("tiny", vocab_size=8192, seed=0)
        adapters.apply(model, method, alpha=16.0, target="all-linear", **options)
        ids = torch.randint(0, 8192, (tokens // 128, 128))
        return lambda: model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    return build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--active", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    v = variants(args.rank, args.active)
    anchor = f"lora r={args.active}"
    for level, make in ((f"one linear {args.dim}x{args.dim}, {args.tokens} tokens", lambda m, o: layer_step(
            args.dim, args.tokens, m, o)), (f"tiny model, all linear layers, {args.tokens} tokens",
                                            lambda m, o: model_step(args.tokens, m, o))):
        med = bench({name: make(m, o) for name, (m, o) in v.items()}, args.repeats)
        print(f"\n{level}: fwd+bwd median of {args.repeats}, R={args.rank}, active rank {args.active}")
        print(f"| variant | ms | ratio vs {anchor} |\n|---|---|---|")
        for name, t in med.items():
            print(f"| {name} | {1e3 * t:.2f} | {t / med[anchor]:.2f}x |")


if __name__ == "__main__":
    main()
