"""``rankwise analyze --model DIR|PRESET``: per-layer spectra of weights and gradients (effective / energy / stable
rank), gradient-subspace drift between batches, and the computational-limits norms of every attention layer.
Progress (weight spectra, each gradient batch, ...) with ETA goes to stderr."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="low-rank structure of a model's weights and gradients", description=__doc__)
    p.add_argument("--model", required=True, help="preset, transformers model folder, or a `rankwise train` --out")
    p.add_argument("--data", help="corpus for the gradient batches (default: the run's, else stdlib-docs)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    p.add_argument("--batches", type=int, default=4, help="batches for gradients and drift (default 4; 0 = weights only)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, L (default 128)")
    p.add_argument("--rank", type=int, default=8, help="subspace rank for the drift (default 8)")
    p.add_argument("--include-output", action="store_true", help="also analyze the LM head")
    p.add_argument("--out", help="folder for analysis.json, heatmap.png, spectra.png")
    p.add_argument("--json", action="store_true", help="print analysis.json instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..analysis import analyze_model, attention_norms
    from ..analysis.inputs import load_model, token_batches
    from ..analysis.report import heatmap, print_table, spectra_plot, write_json
    from ..errors import RankwiseError
    from ..models import max_positions
    from ..paths import check_out_dir
    from ..progress import Progress

    check_out_dir(args.out)
    if args.batches < 0:
        raise RankwiseError(f"--batches must be >= 0, got {args.batches}")
    loaded = load_model(args.model, args.data, args.vocab_size)
    positions = max_positions(loaded.model)
    if positions is not None and args.seq_len > positions:
        raise RankwiseError(f"--seq-len {args.seq_len} is larger than the model's {positions} positions; use "
                            f"--seq-len {positions} or less")
    batches = (token_batches(loaded.data, loaded.vocab_size, args.batches, args.batch_size, args.seq_len,
                             tokenizer=loaded.tokenizer)
               if args.batches else None)
    # units: the weight spectra, each gradient batch, the gradient spectra, the attention limits, the files
    total = 1 + (len(batches) + 2 if batches else 0) + bool(args.out)
    with Progress("analyze", total, unit="steps") as progress:
        report = analyze_model(loaded.model, batches, args.rank, args.include_output, progress)
        limits = []
        if batches:
            with progress.stage("attention limits"):
                limits = attention_norms(loaded.model, batches)
        result = {"model": args.model, "data": loaded.data if batches else None, "batches": report.batches,
                  "layers": report.rows, "attention_limits": limits}
        if args.out:
            out = Path(args.out)
            with progress.stage("files"):
                write_json(result, out / "analysis.json")
                heatmap(report.rows, out / "heatmap.png")
                spectra_plot(report.weight_spectra, report.grad_spectra, out / "spectra.png")
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    cols = [("name", "matrix"), ("full_rank", "k"), ("weight_effective_rank", "W erank"),
            ("weight_energy90_rank", "W e90"), ("weight_energy99_rank", "W e99"), ("weight_stable_rank", "W srank")]
    if batches:
        cols += [("grad_effective_rank", "G erank"), ("grad_energy90_rank", "G e90"), ("grad_stable_rank", "G srank"),
                 ("drift_overlap", "drift overlap"), ("drift_max_angle_deg", "max angle")]
    print_table(report.rows, cols, f"spectra of {args.model}")
    if limits:
        print_table(limits, [("layer", "attention"), ("x_max", "|X|max"), ("q_total", "|XWq|max"),
                             ("k_total", "|XWk|max"), ("q_adapter", "|XdWq|max"), ("gamma", "Gamma"),
                             ("threshold", "sqrt(log L)"), ("below_threshold", "below"), ("score_max", "|score|max"),
                             ("degree", "deg"), ("fast_cheaper", "fast<exact")],
                    "computational limits of LoRA (Hu et al. 2024)")
    if args.out:
        print(f"wrote {Path(args.out) / 'analysis.json'}, heatmap.png, spectra.png")
    return 0
