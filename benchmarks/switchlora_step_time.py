"""SwitchLoRA's switching overhead: a whole training step (forward, backward, switch, update) against ReLoRA's
(the same ``W + B A`` layer and AdamW, no switch) in the same process, as a ratio.

    python benchmarks/switchlora_step_time.py --model mini --rank 32 --batch 16 --seq 128 --steps 20

Rows (median step time over ``--steps`` after 3 warm-up steps): ``relora`` (reset_every beyond the run: plain
``W + B A`` training), ``switchlora`` at the start of training (interval 40, so r/40 vectors a step) and with a
switch every step of every layer (``--interval 1``-like pressure, ``interval=2, frozen_steps=1``). The ratio is
against ``relora``; the switch itself is the extra ``2 r``-wide ``addmm`` per layer plus the masked gathers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rankwise import methods
from rankwise.methods import OptimConfig
from rankwise.models import build_model


def step_time(name: str, options: dict, args: argparse.Namespace) -> float:
    method = methods.get(name, **options)
    model = method.prepare(build_model(args.model, vocab_size=2048, seed=0))
    optimizer = method.build_optimizer(model, OptimConfig(lr=1e-3))
    batch = torch.randint(0, 2048, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(1, args.steps + 4):
        t0 = time.perf_counter()
        logits = model(input_ids=batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step, model, optimizer)
        if step > 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [("relora", "relora", {"rank": args.rank, "reset_every": 10**6, "restart_warmup": 0}),
            ("switchlora", "switchlora", {"rank": args.rank}),
            ("switchlora, a switch every step", "switchlora", {"rank": args.rank, "interval": 2.0,
                                                               "frozen_steps": 1})]
    base = None
    print(f"{args.model}, rank {args.rank}, {args.batch} x {args.seq} tokens, median of {args.steps} steps")
    for label, name, options in rows:
        t = step_time(name, options, args)
        base = base or t
        print(f"{label:34} {t * 1e3:9.1f} ms  {t / base:5.3f}x relora")


if __name__ == "__main__":
    main()
