"""rankwise's ``apollo`` / ``apollo-mini`` presets side by side with apollo-torch's ``APOLLOAdamW``, if installed.

    pip install apollo-torch          # CC-BY-NC: never a rankwise dependency; this script only imports it if present
    python benchmarks/apollo_reference.py --steps 30 --gap 5

Trains two copies of the fidelity tests' tiny LLaMA (square and rectangular matrices; tests/reference/ref_model.py)
on the same batches, one with each optimizer, and prints max |dW| after every step and at the end, per preset, in
fp64 (expected ~1e-15: the presets draw apollo-torch's N(0, 1/r) bases from its seed chain, which numbers params by
their position in the optimizer, so both get the same param order: projected "attn"/"mlp" linears first). The CI
proof is the independent oracle of tests/reference/test_ref_apollo.py; this is the check against the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))

from ref_lowrank import reference_groups  # noqa: E402
from ref_model import side_by_side, tiny_llama  # noqa: E402

from rankwise.optim import build  # noqa: E402

CASES = {"apollo": dict(rank=8, scale=1.0, scale_type="channel", scale_front=False),
         "apollo-mini": dict(rank=1, scale=128.0, scale_type="tensor", scale_front=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gap", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    args = ap.parse_args()
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        print("apollo-torch is not installed (pip install apollo-torch; CC-BY-NC, so never a dependency): nothing "
              "to compare. The oracle test tests/reference/test_ref_apollo.py checks the presets without it.")
        return
    for name, case in CASES.items():
        def ours(model):
            return build(name, model, rank=case["rank"], update_gap=args.gap, lr=args.lr,
                         weight_decay=args.weight_decay)

        def reference(model):
            groups = reference_groups(model, args.weight_decay, rank=case["rank"], proj="random", proj_type="std",
                                      scale_type=case["scale_type"], scale=case["scale"], update_proj_gap=args.gap)
            return APOLLOAdamW(groups, lr=args.lr, scale_front=case["scale_front"])

        diff, trace, _, _ = side_by_side(ours, reference, steps=args.steps, model=tiny_llama(0).double())
        print(f"{name}: max |dW| after {args.steps} steps (refresh every {args.gap}, fp64) {diff:.2e}; worst step "
              f"{max(trace):.2e} (scale_front={case['scale_front']}: only the limiter's 1e-8 differs)")


if __name__ == "__main__":
    main()
