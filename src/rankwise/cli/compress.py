"""``rankwise compress --model DIR|PRESET --ratio R --out DIR``: WeLore's one-shot non-uniform rank reduction
(Jaiswal et al. 2024): a global threshold on min-max normalised spectra removes a fraction R of all ranks; prints
perplexity before / after (with the sequence length it was measured at) and writes the compressed model with its
tokenizer: by default its factors (``welore.safetensors``: each compressed layer as B and A, so the saving shows on
disk; ``--model DIR`` in rankwise loads it), with ``--dense`` a plain transformers folder holding the dense B·A
(as large as the original); welore.json has the ranks."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="WeLore low-rank compression of a model", description=__doc__)
    p.add_argument("--model", required=True, help="preset, transformers model folder, or a `rankwise train` --out")
    p.add_argument("--ratio", type=float, required=True, help="fraction of all ranks to remove, in [0, 1)")
    p.add_argument("--min-ratio", type=float, default=0.0,
                   help="compress a matrix only if its own rank reduction exceeds this (WeLore's min_ratio, default 0)")
    p.add_argument("--rule", choices=["welore", "uniform"], default="welore", help="rank rule (default welore)")
    p.add_argument("--data", help="corpus for the perplexity (default: the run's, else stdlib-docs)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for perplexity (0 = skip)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per validation window (default 128)")
    p.add_argument("--out", help="new folder for the compressed model (factors; see --dense)")
    p.add_argument("--dense", action="store_true",
                   help="write dense B·A weights: a plain transformers folder (as large as the original)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from ..analysis.inputs import load_model, perplexity, token_batches
    from ..analysis.report import write_json
    from ..analysis.welore import compress, densify, save_factored
    from ..data import prepare
    from ..errors import RankwiseError

    if args.eval_batches < 0:
        raise RankwiseError(f"--eval-batches must be >= 0, got {args.eval_batches}")
    if not 0.0 <= args.ratio < 1.0 or not 0.0 <= args.min_ratio < 1.0:
        raise RankwiseError(f"--ratio and --min-ratio must be in [0, 1) (fractions of ranks removed), got "
                            f"{args.ratio} and {args.min_ratio}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankwiseError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    loaded = load_model(args.model, args.data, args.vocab_size)
    model = loaded.model
    batches = (token_batches(loaded.data, loaded.vocab_size, args.eval_batches, 8, args.seq_len, split="val",
                             tokenizer=loaded.tokenizer)
               if args.eval_batches else [])
    result = {"model": args.model, "ratio": args.ratio, "rule": args.rule, "seq_len": args.seq_len}
    if batches:
        result["ppl_before"] = perplexity(model, batches)
    report = compress(model, args.ratio, args.min_ratio, args.rule)
    result.update(report.as_dict())
    if batches:
        result["ppl_after"] = perplexity(model, batches)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            if args.dense:
                densify(model).save_pretrained(tmp)
            else:
                result["factored"] = save_factored(model, tmp)
            tokenizer = loaded.tokenizer or prepare(loaded.data, loaded.vocab_size).hf_tokenizer
            tokenizer.save_pretrained(tmp)
            write_json(result, tmp / "welore.json")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    ppl = (f"; ppl {result['ppl_before']:.2f} -> {result['ppl_after']:.2f} (seq-len {args.seq_len})"
           if batches else "")
    print(f"{args.rule}: removed {report.rank_reduction:.1%} of ranks in {len(report.lrc)} matrices, "
          f"parameters {report.params_before:,} -> {report.params_after:,} ({report.param_ratio:.1%}){ppl}")
    if out is not None:
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".bin"))
        kind = "plain transformers model, dense B·A" if args.dense else "factors; rankwise --model loads it"
        print(f"wrote {out} ({kind}; weights {size / 2**20:.1f} MiB; ranks in welore.json)")
    return 0
