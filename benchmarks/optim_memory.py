"""Optimizer-state bytes per preset on GaLore's model configs, from shapes only (meta device: nothing allocated).

    python benchmarks/optim_memory.py --presets llama-60m llama-1b --dtype fp32

Ranks follow GaLore's Table 2 (60M: 128, 130M/350M: 256, 1B: 512); the formula is
``SplitOptimizer.expected_state_bytes`` (tests check it against the measured state of real runs, byte for byte).
Block presets (badam, lisa) hold the moments of one transformer layer at a time.
"""

from __future__ import annotations

import argparse

import torch

from rankwise.models import build_model
from rankwise.optim import PRESETS, build

RANKS = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["llama-60m", "llama-1b"])
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of params, grads and state")
    args = ap.parse_args()
    print(f"optimizer state, {args.dtype} (GiB = 2^30 bytes; % of AdamW)")
    print("| model | rank | " + " | ".join(PRESETS) + " |")
    print("|---|---|" + "---|" * len(PRESETS))
    for preset in args.presets:
        model = build_model(preset, device="meta").to(DTYPES[args.dtype])
        rank = RANKS.get(preset, 128)
        sizes = {}
        for name in PRESETS:
            kw = {"rank": rank} if name.removesuffix("-8bit") in ("galore", "fira", "frugal") else {}
            sizes[name] = build(name, model, **kw).expected_state_bytes()
        cells = [f"{b / 2**30:.3f} ({100 * b / sizes['adamw']:.0f}%)" for b in sizes.values()]
        print(f"| {preset} | {rank} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
