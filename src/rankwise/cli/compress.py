"""``rankwise compress --model DIR|PRESET (--ratio R | --quantize nf4|int8) [--eora RANK] --out DIR``: one-shot
compression and training-free compensation.

- ``--ratio R``: WeLore's non-uniform rank reduction (Jaiswal et al. 2024): a global threshold on min-max normalised
  spectra removes a fraction R of all ranks.
- ``--quantize``: NF4 / int8 weights for every linear layer but the output layer (``rankwise.quant``; after WeLore
  when both are given).
- ``--eora RANK``: EoRA (Liu et al. 2024): each compressed layer gets a rank-RANK correction ``B A`` fitted in the
  eigenspace of its calibration activations; reports how much of the compression's loss increase it recovers.

Prints perplexity before / after (with the sequence length it was measured at); its stages (perplexities, WeLore,
quantization, EoRA, writing) show as a progress bar with ETA on stderr (plain lines when it is not a terminal). ``--out`` receives the compressed
model with its tokenizer: after WeLore alone, its factors (``welore.safetensors``: each compressed layer as B and A,
so the saving shows on disk; ``--model DIR`` in rankwise loads it); with ``--dense``, ``--quantize`` or ``--eora`` a plain
transformers folder (dense B·A, dequantized); with ``--peft`` a transformers base whose factored layers are zero plus
``adapter/``, a PEFT LoRA holding their factors at WeLore's per-layer ranks (``rank_pattern``); ``welore.json``
(ranks and the report) and, with ``--eora``, ``eora/`` (a PEFT LoRA adapter).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="WeLore / quantization of a model, EoRA compensation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset, transformers model folder, or a `rankwise train` --out")
    p.add_argument("--ratio", type=float, help="WeLore: fraction of all ranks to remove, in [0, 1)")
    p.add_argument("--min-ratio", type=float, default=0.0,
                   help="compress a matrix only if its own rank reduction exceeds this (WeLore's min_ratio, default 0)")
    p.add_argument("--rule", choices=["welore", "uniform"], default="welore", help="rank rule (default welore)")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="quantize the linear layers (needs the [quant] extra)")
    p.add_argument("--eora", type=int, metavar="RANK", help="EoRA compensation of rank RANK per compressed layer")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="training batches (8 x seq-len tokens each) of EoRA's calibration activations (default 8)")
    p.add_argument("--data", help="corpus for the perplexity (default: the run's, else stdlib-docs)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for perplexity (0 = skip)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per validation window (default 128)")
    p.add_argument("--out", help="new folder for the compressed model (factors; see --dense)")
    p.add_argument("--dense", action="store_true",
                   help="write dense B·A weights: a plain transformers folder (as large as the original)")
    p.add_argument("--peft", action="store_true",
                   help="WeLore: write the low-rank components as a PEFT LoRA adapter (OUT/adapter, per-layer ranks "
                        "in rank_pattern) over OUT, a transformers base with those layers' weights zero")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy
    import json
    import math
    from pathlib import Path

    import torch

    from ..analysis.eora import ADAPTER, compensate, dense_weight
    from ..analysis.inputs import load_model, perplexity, token_batches
    from ..analysis.layers import linear_weights
    from ..analysis.report import write_json
    from ..analysis.welore import compress, densify, peft_form, save_factored
    from ..data import prepare
    from ..errors import RankwiseError
    from ..export import check_new_folder, staged
    from ..models import max_positions
    from ..paths import check_out_dir
    from ..progress import Progress

    check_out_dir(args.out)
    if args.eval_batches < 0:
        raise RankwiseError(f"--eval-batches must be >= 0, got {args.eval_batches}")
    if args.ratio is None and args.quantize is None:
        raise RankwiseError("nothing to compress: give --ratio R (WeLore) and/or --quantize nf4|int8")
    if args.ratio is not None and (not 0.0 <= args.ratio < 1.0 or not 0.0 <= args.min_ratio < 1.0):
        raise RankwiseError(f"--ratio and --min-ratio must be in [0, 1) (fractions of ranks removed), got "
                            f"{args.ratio} and {args.min_ratio}")
    if args.peft and (args.ratio is None or args.quantize or args.eora or args.dense):
        raise RankwiseError("--peft writes WeLore's low-rank components as a LoRA adapter: give --ratio, without "
                            "--quantize, --eora or --dense")
    if args.eora is not None and (args.eora <= 0 or args.calib_batches <= 0):
        raise RankwiseError(f"--eora RANK and --calib-batches must be positive, got {args.eora} and "
                            f"{args.calib_batches}")
    if args.quantize:
        from ..quant import require_torchao

        require_torchao()
    out = Path(args.out) if args.out else None
    if out is not None:
        check_new_folder(out)
    loaded = load_model(args.model, args.data, args.vocab_size)
    positions = max_positions(loaded.model)
    if positions is not None and args.seq_len > positions:
        raise RankwiseError(f"--seq-len {args.seq_len} is larger than the model's {positions} positions; use "
                            f"--seq-len {positions} or less")
    original = loaded.model.eval()
    batches = (token_batches(loaded.data, loaded.vocab_size, args.eval_batches, 8, args.seq_len, split="val",
                             tokenizer=loaded.tokenizer)
               if args.eval_batches else [])
    result = {"model": args.model, "ratio": args.ratio, "rule": args.rule, "quantize": args.quantize,
              "seq_len": args.seq_len}
    stages = [name for name, on in (("ppl before", batches), (args.rule, args.ratio is not None),
                                    (args.quantize, args.quantize), ("ppl after", batches), ("eora", args.eora),
                                    ("ppl eora", args.eora and batches), ("write", out is not None)) if on]
    with Progress("compress", len(stages), unit="stages") as progress:
        if batches:
            with progress.stage("ppl before"):
                result["ppl_before"] = perplexity(original, batches)
        model = copy.deepcopy(original) if args.eora else original  # EoRA needs the original weights
        report = None
        if args.ratio is not None:
            with progress.stage(args.rule):
                report = compress(model, args.ratio, args.min_ratio, args.rule)
            result.update(report.as_dict())
        if args.quantize:
            from ..quant import quantize_base, quantized_layers

            with progress.stage(args.quantize):
                quantize_base(model.requires_grad_(False), args.quantize)
            result["quantized_layers"] = len(quantized_layers(model))
        if batches:
            with progress.stage("ppl after"):
                result["ppl_after"] = perplexity(model, batches)
        if args.eora:
            with progress.stage("eora"):
                calib = token_batches(loaded.data, loaded.vocab_size, args.calib_batches, 8, args.seq_len,
                                      split="train", tokenizer=loaded.tokenizer)
                targets = {n: model.get_submodule(n) for n in linear_weights(original)
                           if not torch.equal(dense_weight(original.get_submodule(n)),
                                              dense_weight(model.get_submodule(n)))}
                if not targets:
                    raise RankwiseError("the compression changed no layer (e.g. --ratio 0): nothing for EoRA to "
                                        "compensate")
                result.update(compensate(original, targets, calib, args.eora).as_dict())
            if batches:
                with progress.stage("ppl eora"):
                    result["ppl_eora"] = perplexity(original, batches)
                lost = math.log(result["ppl_after"]) - math.log(result["ppl_before"])
                regained = math.log(result["ppl_after"]) - math.log(result["ppl_eora"])
                result["eora_recovery"] = regained / lost if lost > 0 else None
        if out is not None:
            from ..adapters import save_adapter
            from ..quant import dequantize_base

            with progress.stage("write"), staged(out) as tmp:
                if args.eora:
                    save_adapter(original, tmp / ADAPTER, ADAPTER, base_model_name_or_path=str(out))
                if args.peft:
                    base, adapted = peft_form(model)
                    base.save_pretrained(tmp)
                    save_adapter(adapted, tmp / "adapter", base_model_name_or_path=str(out))
                elif args.dense or args.quantize or args.eora or report is None:  # EoRA's adapter needs a plain base
                    dequantize_base(densify(model)).save_pretrained(tmp)
                else:
                    result["factored"] = save_factored(model, tmp)
                tokenizer = loaded.tokenizer or prepare(loaded.data, loaded.vocab_size).hf_tokenizer
                tokenizer.save_pretrained(tmp)
                write_json(result, tmp / "welore.json")
    if args.json:
        print(json.dumps(result))
        return 0
    ppl = (f"; ppl {result['ppl_before']:.2f} -> {result['ppl_after']:.2f} (seq-len {args.seq_len})"
           if batches else "")
    if report is not None:
        print(f"{args.rule}: removed {report.rank_reduction:.1%} of ranks in {len(report.lrc)} matrices, "
              f"parameters {report.params_before:,} -> {report.params_after:,} ({report.param_ratio:.1%}){ppl}")
    if args.quantize:
        print(f"{args.quantize}: quantized {result['quantized_layers']} linear layers" + ("" if report else ppl))
    if args.eora and batches:
        rec = result["eora_recovery"]
        print(f"eora rank {args.eora}: ppl {result['ppl_after']:.2f} -> {result['ppl_eora']:.2f}"
              + (f" (recovers {rec:.1%} of the loss increase)" if rec is not None else ""))
    if out is not None:
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".bin"))
        kind = ("factors; rankwise --model loads it" if "factored" in result else
                "base with the low-rank layers zero + their PEFT LoRA in adapter/" if args.peft else
                "plain transformers model")
        print(f"wrote {out} ({kind}; weights {size / 2**20:.1f} MiB; report in welore.json"
              + (f", EoRA adapter in {out / ADAPTER})" if args.eora else ")"))
    return 0

