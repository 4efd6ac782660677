"""Adapter fwd+bwd speed and memory: rankwise LoRA vs HF PEFT LoRA on the same model and batch, plus every
rankwise variant (trainable params, tokens/s, activation memory).

    python benchmarks/adapters_speed.py --preset tiny --batch-size 8 --seq-len 256 --repeats 7
    python benchmarks/adapters_speed.py --preset small --dora          # DoRA / LoRA step time, rankwise vs PEFT

Each repeat times ``--iters`` fwd+bwd passes of every contender in turn (interleaved, so load drift on a shared
machine hits all alike); reported: median tokens/s over repeats and the ratio ours / peft. Memory: on CUDA the peak
allocated bytes of one fwd+bwd; everywhere the exact bytes autograd saves for backward (unique storages).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rankwise import adapters
from rankwise.models import build_model, count_params

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "lora-xs": {}, "nola": {}, "vera": {}, "randlora": {}}


def peft_lora(model, r, alpha, target, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target, lora_dropout=0.0,
                                            use_dora=dora))


def step(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
    # an in-place "update" of every trainable tensor, as an optimizer step makes, so caches keyed on the tensors'
    # versions (DoRA's weight norm) are recomputed every step as in training
    with torch.no_grad():
        torch._foreach_add_([p for p in model.parameters() if p.requires_grad], 0.0)


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one step, parameters and buffers (which
    exist anyway) excluded: the activation memory each adapter adds."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, batch)
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def cuda_peak(model, batch) -> int | None:
    if batch.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, batch)
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target", default="all-linear")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--variants", action="store_true", help="also time every rankwise variant")
    p.add_argument("--dora", action="store_true",
                   help="also time DoRA (rankwise and PEFT) and print each one's DoRA / LoRA step-time ratio")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target = args.target if args.target == "all-linear" else args.target.split(",")

    def base():
        return build_model(args.preset, seed=0).to(args.device, dtype)

    contenders = {"peft-lora": peft_lora(base(), args.r, args.alpha, target)}
    if args.dora:
        contenders["peft-dora"] = peft_lora(base(), args.r, args.alpha, target, dora=True)
    for name, opts in VARIANTS.items() if args.variants else [("lora", {})]:
        kind = "lora" if name == "rslora" else name
        contenders[name] = adapters.apply(base(), kind, r=args.r, alpha=args.alpha, target=target, **opts)
    if args.dora:
        contenders["dora"] = adapters.apply(base(), "lora", r=args.r, alpha=args.alpha, target=target, dora=True)
    batch = torch.randint(0, 8192, (args.batch_size, args.seq_len + 1), device=args.device)
    tokens = args.batch_size * args.seq_len * args.iters
    times: dict[str, list[float]] = {n: [] for n in contenders}
    for m in contenders.values():
        m.train()
        step(m, batch)  # warm-up
        m.zero_grad(set_to_none=True)
    for _ in range(args.repeats):
        for name, m in contenders.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.iters):
                step(m, batch)
                m.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    speed = {n: tokens / statistics.median(ts) for n, ts in times.items()}
    print(f"{args.preset} {args.dtype} on {args.device}, batch {args.batch_size} x {args.seq_len}, r={args.r}, "
          f"target={args.target}, median of {args.repeats} x {args.iters} fwd+bwd")
    print(f"{'adapter':<10} {'trainable':>10} {'tokens/s':>10} {'vs peft':>8} {'saved act MiB':>14} {'peak MiB':>9}")
    for name, m in contenders.items():
        peak = cuda_peak(m, batch)
        print(f"{name:<10} {count_params(m)[0]:>10,} {speed[name]:>10,.0f} {speed[name] / speed['peft-lora']:>8.3f} "
              f"{saved_bytes(m, batch) / 2**20:>14.1f} {'' if peak is None else f'{peak / 2**20:.1f}':>9}")
    if args.dora:  # step time ratio = inverse tokens/s ratio, each library against its own LoRA
        print(f"DoRA / LoRA step time: rankwise {speed['lora'] / speed['dora']:.3f}, "
              f"peft {speed['peft-lora'] / speed['peft-dora']:.3f}")


if __name__ == "__main__":
    main()
