"""``rankwise export RUN --merged DIR`` | ``--adapter DIR``: the merged model as a plain transformers folder
(safetensors + tokenizer; ``AutoModelForCausalLM.from_pretrained`` loads it), or the run's adapter in PEFT's format.
A quantized base is dequantized, merged in fp32 and written in bf16 (``--dtype`` to choose; ``--requantize int8`` to
write it re-quantized)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's merged model or its adapter", description=__doc__)
    p.add_argument("run", metavar="RUN", help="the --out folder of `rankwise train`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="DIR", help="new folder for the merged transformers model")
    what.add_argument("--adapter", metavar="DIR", help="new folder for the adapter (PEFT format)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="merged weights' dtype (default: the run's; bf16 for a quantized base)")
    p.add_argument("--requantize", choices=["int8", "nf4"],
                   help="with --merged: write the merged weights re-quantized (int8: torchao through transformers; "
                        "loading needs torchao; nf4 cannot be serialized)")
    p.add_argument("--device", default="cpu", help="where to load and merge (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import RankwiseError
    from ..export import export_adapter, export_merged

    if args.adapter:
        if args.dtype or args.requantize:
            raise RankwiseError("--dtype and --requantize go with --merged (an adapter keeps its trained dtype)")
        print(f"wrote {export_adapter(args.run, args.adapter, args.device)} (PEFT adapter)")
    else:
        out = export_merged(args.run, args.merged, args.dtype, args.device, args.requantize)
        print(f"wrote {out} (transformers model{', int8 weights' if args.requantize else ''})")
    return 0
