"""``rankwise compress --model DIR|PRESET --ratio R --out DIR``: WeLore's one-shot non-uniform rank reduction
(Jaiswal et al. 2024): a global threshold on min-max normalised spectra removes a fraction R of all ranks; prints
perplexity before / after and writes a plain transformers model folder (+ welore.json with the ranks)."""

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
    p.add_argument("--out", help="new folder for the compressed model")
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
    from ..analysis.welore import compress, densify
    from ..atomic import dir_mode
    from ..errors import RankwiseError
    from ..models import max_positions
    from ..paths import check_out_dir

    check_out_dir(args.out)
    if args.eval_batches < 0:
        raise RankwiseError(f"--eval-batches must be >= 0, got {args.eval_batches}")
    if not 0.0 <= args.ratio < 1.0 or not 0.0 <= args.min_ratio < 1.0:
        raise RankwiseError(f"--ratio and --min-ratio must be in [0, 1) (fractions of ranks removed), got "
                            f"{args.ratio} and {args.min_ratio}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankwiseError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    loaded = load_model(args.model, args.data, args.vocab_size)
    positions = max_positions(loaded.model)
    if positions is not None and args.seq_len > positions:
        raise RankwiseError(f"--seq-len {args.seq_len} is larger than the model's {positions} positions; use "
                            f"--seq-len {positions} or less")
    model = loaded.model
    batches = (token_batches(loaded.data, args.vocab_size, args.eval_batches, 8, args.seq_len, split="val")
               if args.eval_batches else [])
    result = {"model": args.model, "ratio": args.ratio, "rule": args.rule}
    if batches:
        result["ppl_before"] = perplexity(model, batches)
    report = compress(model, args.ratio, args.min_ratio, args.rule)
    result.update(report.as_dict())
    if batches:
        result["ppl_after"] = perplexity(model, batches)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        tmp.chmod(dir_mode())  # mkdtemp's 0700 -> what mkdir gives under the umask
        try:
            densify(model).save_pretrained(tmp)
            write_json(result, tmp / "welore.json")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    ppl = (f"; ppl {result['ppl_before']:.2f} -> {result['ppl_after']:.2f}" if batches else "")
    print(f"{args.rule}: removed {report.rank_reduction:.1%} of ranks in {len(report.lrc)} matrices, "
          f"parameters {report.params_before:,} -> {report.params_after:,} ({report.param_ratio:.1%}){ppl}")
    if out is not None:
        print(f"wrote {out} (plain transformers model; ranks in welore.json)")
    return 0
