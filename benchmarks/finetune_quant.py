"""Quantized base, merge error and EoRA recovery on a trained preset (numbers in docs/finetune.md).

    python benchmarks/finetune_quant.py --run runs/tiny          # a `rankwise train --out` of a full-rank run
    python benchmarks/finetune_quant.py --run runs/tiny --libraries   # + torchao vs bitsandbytes on one matrix

1. Weight bytes of the model with a bf16 base + LoRA vs an NF4 / int8 base + LoRA (tiny and small presets, counted
   on real models with ``plan.breakdown``; equal to the planner's count, tests/finetune/test_quant_base.py).
2. Merge error: a short LoRA fine-tune on the NF4 base of ``--run``; the merged bf16 / fp32 model vs the unmerged
   quantized one (max |logit difference| / max |logit|, validation loss).
3. EoRA: the run's model quantized (NF4, int8) or WeLore-compressed, then compensated with EoRA and with plain SVD at
   each ``--ranks``; recovery = (loss_compressed - loss_compensated) / (loss_compressed - loss_original).
Timings are not taken here except, with ``--libraries``, one coarse per-call time (machine load makes it rough).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from rankwise import methods, quant
from rankwise.analysis.eora import compensate, dense_weight
from rankwise.analysis.inputs import load_model, perplexity, token_batches
from rankwise.analysis.layers import linear_weights
from rankwise.analysis.welore import compress
from rankwise.export import _requantized, merged_model
from rankwise.methods import OptimConfig
from rankwise.models import build_model
from rankwise.plan import breakdown
from rankwise.train import TrainConfig, train


def memory() -> list[dict]:
    rows = []
    for preset in ("tiny", "small"):
        for scheme in (None, "nf4", "int8"):
            method = methods.get("lora", rank=8, target="all-linear")
            model = method.prepare(build_model(preset, seed=0).to(torch.bfloat16))
            if scheme:
                quant.quantize_method_base(model, method, scheme)
            b = breakdown(model, method.build_optimizer(model, OptimConfig()))
            linear = sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
            rows.append({"preset": preset, "base": scheme or "bf16", "weights_bytes": b["weights_frozen"] +
                         b["weights_trainable"], "frozen_bytes": b["weights_frozen"], "base_linear_weights": linear})
    return rows


def libraries() -> dict:
    """torchao NF4 vs bitsandbytes NF4 on one 1024 x 1024 Gaussian matrix (CPU, bf16 activations 64 x 1024)."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    torch.manual_seed(0)
    w = torch.randn(1024, 1024) * 0.02
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    dense = torch.nn.Linear(1024, 1024, bias=False).requires_grad_(False)
    dense.weight.copy_(w)
    ours = quant.QuantizedLinear(dense.bfloat16(), "nf4")
    theirs = bnb.nn.Linear4bit(1024, 1024, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    theirs.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, quant_type="nf4", blocksize=64)
    theirs = theirs.to("cpu")
    deq = {"torchao": quant.dequantize(ours.weight, torch.float32),
           "bitsandbytes": bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float()}
    fns = {"torchao": lambda: ours(x), "bitsandbytes": lambda: theirs(x),
           "bf16 dense": lambda: F.linear(x, w.bfloat16())}
    out = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        row = {"ms_per_call": (time.perf_counter() - t0) / 5 * 1e3}
        if name in deq:
            row["rel_error"] = ((deq[name] - w).norm() / w.norm()).item()
        out[name] = row
    return out


def merge_error(run: str, data: str, vocab: int) -> dict:
    loaded = load_model(run)
    cfg = TrainConfig(preset="tiny", method="lora", method_options={"r": 8, "target": "all-linear"}, data=data,
                      vocab_size=vocab, steps=30, batch_size=8, seq_len=64, lr=2e-3, warmup_steps=3, dtype="fp32",
                      eval_every=0, eval_batches=4, quiet=True, quantize="nf4")
    result = train(cfg, model=loaded.model)
    model = result.model.eval()
    batches = token_batches(data, vocab, 4, 8, 64, split="val")
    x = batches[0][:, :-1]
    with torch.no_grad():
        want = model(input_ids=x).logits.float()
        loss_q = math.log(perplexity(model, batches))
        row = {"lora_on_nf4": {"initial_eval_loss": result.metrics["initial_eval_loss"],
                               "final_eval_loss": result.metrics["final_eval_loss"]}}
        for dtype in (torch.float32, torch.bfloat16):
            merged = merged_model(copy.deepcopy(model), dtype).float()
            got = merged(input_ids=x).logits.float()
            row[str(dtype).split(".")[-1]] = {"max_abs_logit_diff_over_max_logit":
                                              ((got - want).abs().max() / want.abs().max()).item(),
                                              "eval_loss_diff": math.log(perplexity(merged, batches)) - loss_q}
        with tempfile.TemporaryDirectory() as tmp:  # --requantize int8: bf16 merge re-quantized through transformers
            merged_model(copy.deepcopy(model), torch.bfloat16).save_pretrained(tmp)
            requantized = _requantized(Path(tmp), torch.bfloat16)
            got = requantized(input_ids=x).logits.float()
            row["int8_requantized"] = {"max_abs_logit_diff_over_max_logit":
                                       ((got - want).abs().max() / want.abs().max()).item(),
                                       "eval_loss_diff": math.log(perplexity(requantized, batches)) - loss_q}
    return row


def eora(run: str, data: str, vocab: int, ranks: list[int], calib: int) -> list[dict]:
    original = load_model(run).model.eval()
    batches = token_batches(data, vocab, 8, 8, 128, split="val")
    calib_batches = token_batches(data, vocab, calib, 8, 128, split="train")
    loss0 = math.log(perplexity(original, batches))
    rows = []
    for kind in ("nf4", "int8", "welore-0.5"):
        compressed = copy.deepcopy(original)
        if kind.startswith("welore"):
            compress(compressed, 0.5)
        else:
            quant.quantize_base(compressed.requires_grad_(False), kind)
        loss_c = math.log(perplexity(compressed, batches))
        for r in ranks:
            row = {"compression": kind, "rank": r, "loss_original": loss0, "loss_compressed": loss_c}
            for how in ("eigen", "svd"):
                model, comp = copy.deepcopy(original), copy.deepcopy(compressed)
                targets = {n: comp.get_submodule(n) for n in linear_weights(original)
                           if not torch.equal(dense_weight(original.get_submodule(n)),
                                              dense_weight(comp.get_submodule(n)))}
                c = compensate(model, targets, calib_batches, r, how)
                loss = math.log(perplexity(model, batches))
                row[how] = {"loss": loss, "recovery": (loss_c - loss) / (loss_c - loss0),
                            "weighted_error_after": c.weighted_error_after,
                            "weighted_error_before": c.weighted_error_before}
            rows.append(row)
            print(json.dumps(row))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `rankwise train --out` folder (full-rank pre-trained)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--libraries", action="store_true")
    p.add_argument("--parts", nargs="+", default=["memory", "merge", "eora"], choices=["memory", "merge", "eora"])
    p.add_argument("--out", help="write the results here (JSON)")
    args = p.parse_args()
    cfg = json.loads(open(f"{args.run}/config.json").read())
    results = {}
    if "memory" in args.parts:
        results["memory"] = memory()
        print(json.dumps(results["memory"], indent=1))
    if args.libraries:
        results["libraries"] = libraries()
        print(json.dumps(results["libraries"], indent=1))
    if "merge" in args.parts:
        results["merge"] = merge_error(args.run, cfg["data"], cfg["vocab_size"])
        print(json.dumps(results["merge"], indent=1))
    if "eora" in args.parts:
        results["eora"] = eora(args.run, cfg["data"], cfg["vocab_size"], args.ranks, args.calib_batches)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
