"""``rankwise train``: train one model with one method and write metrics, plots, its tokenizer and a checkpoint to
--out (default: a new folder ``runs/<method>-<UTC time>``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields

from ..errors import RankwiseError
from ..train import TrainConfig

# CLI flags that are method options, passed to the method's factory when given.
METHOD_FLAGS = {"rank": int, "alpha": float, "target": str, "update_gap": int, "scale": float}


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_options(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k, None) is not None}
    for item in args.opt or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RankwiseError(f"--opt takes KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = parse_value(value)
    return options


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by commands that train (train, bench); every default is TrainConfig's."""
    d = TrainConfig()
    p.add_argument("--preset", help=f"model preset (random init) or transformers config/model folder "
                                    f"(default {d.preset})")
    p.add_argument("--model", metavar="NAME_OR_DIR",
                   help="start from pretrained weights, tokenized with the model's own tokenizer: a `rankwise train "
                        "--out` folder, a transformers folder (save_pretrained) or a Hugging Face hub name")
    p.add_argument("--data", help=f"stdlib-docs, stdlib-code, a .txt/.jsonl file or folder, hf:NAME[:CONFIG] "
                                  f"(default {d.data})")
    p.add_argument("--pad", dest="pack", action="store_const", const=False,
                   help="instruction data ({prompt, completion} / {messages} .jsonl): one right-padded example per "
                        "row instead of packing examples into windows (the loss is masked on prompts either way)")
    p.add_argument("--vocab-size", type=int, help=f"tokenizer vocabulary (default {d.vocab_size})")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d.grad_accum})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warmup steps (default {d.warmup_steps})")
    p.add_argument("--min-lr-ratio", type=float, help=f"final lr / peak lr of the cosine (default {d.min_lr_ratio})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, help=f"gradient norm clip, 0 = off (default {d.grad_clip})")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help=f"bf16 = autocast (default {d.dtype})")
    p.add_argument("--seed", type=int, help=f"seed of init and data order (default {d.seed})")
    p.add_argument("--eval-every", type=int, help=f"steps between validations, 0 = end only (default {d.eval_every})")
    p.add_argument("--eval-batches", type=int, help=f"validation batches (default {d.eval_batches})")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--rank", "--r", dest="rank", type=int, help="rank of the method (projection / adapter rank)")
    p.add_argument("--alpha", type=float, help="adapter scaling alpha")
    p.add_argument("--target", help="modules to adapt: names (comma-separated), a regex, or all-linear")
    p.add_argument("--update-gap", type=int, help="steps between subspace refreshes")
    p.add_argument("--scale", type=float, help="scale of the low-rank update (GaLore's alpha)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="any other method option (repeatable)")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--log", choices=["tensorboard", "wandb"],
                   help="also log every step's metrics to TensorBoard (OUT/tensorboard; extra [tensorboard]) or "
                        "Weights & Biases (extra [wandb]; WANDB_MODE=offline works without an account)")


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (defaults, or a resumed run's config) overridden by the flags that were given."""
    cfg = base or TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("method_options", "quiet"):
            setattr(cfg, f.name, value)
    options = method_options(args)
    if options or base is None:
        cfg.method_options = {**(cfg.method_options if base else {}), **options}
    cfg.quiet = args.quiet
    return cfg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with one method", description=__doc__)
    p.add_argument("--method", help="a registered method (`rankwise methods`; default full)")
    add_train_flags(p)
    p.add_argument("--out", help="run folder: metrics.json(l), train_config.json, loss_curve.png, tokenizer, "
                                 "checkpoint.pt (default: a new runs/<method>-<UTC time>)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    p.add_argument("--stop-at", type=int, help="stop after this step, resumable (for time-sliced jobs)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR bit-exactly (its config is reused; "
                                                   "settings that change the computation are refused)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its run "
                                                            "files are removed first)")
    p.add_argument("--extend", action="store_true", help="with --resume and a larger --steps: stretch the cosine "
                   "schedule to the new --steps (the lr jumps up; not a straight run). Default: keep the run's "
                   "schedule, which stays at its final lr past the original --steps")
    p.add_argument("--allow-change", action="append", metavar="SETTING",
                   help="with --resume: let SETTING (e.g. lr, seq_len; comma-separated, repeatable) differ from "
                        "the run's (the continuation is then not bit-exact)")
    p.add_argument("--on-nonfinite", choices=["stop", "skip"],
                   help="a NaN/inf loss or gradient norm: stop (default; keeps the last good checkpoint, exit 3) "
                        "or skip that step's update and go on")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (DDP/FSDP; default 1)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="with several processes: ddp or fsdp (default ddp)")
    p.add_argument("--quantize", choices=["nf4", "int8"],
                   help="adapter methods: store the frozen base's linear weights in 4-bit NF4 or int8 (QLoRA-style; "
                        "needs the [quant] extra)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint, paths
    from ..train import train

    if args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = None
    if args.resume:
        base = TrainConfig.of_run(checkpoint.load(args.resume)["config"])
        base.out = args.out or args.resume
    if args.model is not None and args.preset is not None:
        raise RankwiseError("--model and --preset both name the model; pass one (--model: pretrained weights, "
                            "--preset: an architecture trained from scratch)")
    cfg = config_from_args(args, base)
    cfg.resume = args.resume
    if cfg.model is not None and os.path.isdir(cfg.model):
        cfg.model = os.path.abspath(cfg.model)  # the run's config names its base wherever it is read from
    if cfg.out is None:
        if "WORLD_SIZE" in os.environ:  # torchrun: ranks would not agree on a time-stamped name
            print("rankwise train: warning: no --out given; nothing will be saved", file=sys.stderr)
        else:
            cfg.out = default_out(cfg.method)  # named in the summary line at the end
    cfg.overwrite, cfg.extend = args.overwrite, args.extend
    cfg.allow_change = tuple(a.strip().replace("-", "_") for item in args.allow_change or [] for a in item.split(",")
                             if a.strip())
    cfg.validate()
    paths.check_out_dir(cfg.out)
    if not args.resume:
        paths.check_new_run(cfg.out, cfg.overwrite)
    if args.nproc < 1:
        raise RankwiseError(f"--nproc must be a positive integer, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        import torch

        from ..distributed import STRATEGIES, check_batch, launch
        from ..methods import get

        cfg.validate()
        check_batch(cfg.batch_size, args.nproc)
        # what every worker would refuse, refused once here, before any process starts
        STRATEGIES[cfg.parallel](torch.device("cpu"), 0, args.nproc).check(get(cfg.method, **cfg.method_options))
        m = launch(args.nproc, train_metrics, cfg)
    else:
        m = train(cfg).metrics
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{m['method']}: eval loss {m['initial_eval_loss']:.4f} -> {m['final_eval_loss']:.4f} "
          f"(ppl {m['eval_ppl']:.2f} at seq-len {cfg.seq_len}) | {m['tokens_per_s']:,.0f} tokens/s | optimizer state "
          f"{m['optimizer_state_bytes'] / 2**20:.2f} MiB | peak mem {m['peak_mem_bytes'] / 2**20:.1f} MiB"
          + (f" | wrote {cfg.out}" if cfg.out else ""))
    return 0


def default_out(method: str, root: str = "runs") -> str:
    """``runs/<method>-<UTC time>``, with a ``-N`` suffix if that folder exists."""
    stem = os.path.join(root, f"{method}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    path, n = stem, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}"
    return path


def train_metrics(cfg: TrainConfig) -> dict:
    """``train(cfg).metrics``: a top-level function, so launched worker processes can run it."""
    from ..train import train

    return train(cfg).metrics
