"""Low-bit optimizer state: the two libraries' block-wise codecs and the 8-bit step, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/lowbit_state.py --numel 1048576 --repeats 7

Codec rows: quantize + dequantize of one moment of ``--numel`` fp32 entries (signed, as a first moment), bitsandbytes'
``quantize_blockwise`` / ``dequantize_blockwise`` (8-bit, block 256) and torchao's ``OptimState8bit`` /
``OptimState4bit`` eager ops (block 256 / 128), as a ratio to bitsandbytes; max error in units of the block absmax;
bytes per entry (codes + fp32 absmax). Step rows: one ``SplitOptimizer`` AdamW step on a 4096 x (numel / 4096)
matrix with fp32 / 8-bit / 4-bit state, as a ratio to ``torch.optim.AdamW`` (foreach) on the same matrix. Medians of
``--repeats``, interleaved.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import bitsandbytes.functional as F
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from rankwise.optim import SplitOptimizer, lowbit

    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    code = lowbit._map(8, True, x.device)

    def bnb8():
        q, s = F.quantize_blockwise(x, code=code, blocksize=256)
        return F.dequantize_blockwise(q, absmax=s.absmax, code=code, blocksize=256)

    def torchao(cls, block):
        state = cls.zeros(x.shape, True, block)

        def run():
            state.copy_(x)
            return state.dequantize()
        return run

    codecs = {"bitsandbytes 8-bit (block 256)": (bnb8, 1 + 4 / 256),
              "torchao 8-bit (block 256)": (torchao(OptimState8bit, 256), 1 + 4 / 256),
              "torchao 4-bit (block 128)": (torchao(OptimState4bit, 128), 0.5 + 4 / 128)}
    base = timed(bnb8, args.repeats)
    print(f"numel {args.numel}, {torch.get_num_threads()} thread(s); bitsandbytes 8-bit round trip {base * 1e3:.1f} ms")
    print("| codec | time / bitsandbytes | max error / block absmax | bytes per entry |")
    print("|---|---|---|---|")
    for name, (fn, nbytes) in codecs.items():
        block = 128 if "4-bit" in name else 256
        err = ((fn() - x).abs().view(-1, block).amax(1) / x.abs().view(-1, block).amax(1)).max().item()
        print(f"| {name} | {timed(fn, args.repeats) / base:.2f} | {err:.4f} | {nbytes:.4f} |")

    shape = (4096, args.numel // 4096)
    w0, g = torch.randn(shape), torch.randn(shape)
    makers = {"torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)}
    makers |= {f"SplitOptimizer adamw, state_bits={b}": (lambda b: lambda ps: SplitOptimizer(
        ps, project=False, lr=1e-3, state_bits=b))(b) for b in (None, 8, 4)}
    steps = {}
    for name, make in makers.items():
        p = torch.nn.Parameter(w0.clone())
        p.grad = g
        opt = make([p])
        steps[name] = opt.step
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved
        for name, step in steps.items():
            times[name].append(timed(step, 1))
    anchor = statistics.median(times["torch AdamW (foreach)"])
    print(f"\nAdamW step on {shape[0]} x {shape[1]}: torch AdamW {anchor * 1e3:.1f} ms")
    print("| optimizer | step time / torch AdamW |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) / anchor:.2f} |")


if __name__ == "__main__":
    main()
