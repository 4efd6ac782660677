"""``rankwise merge ADAPTER_DIR --out MODEL_DIR``: fold an adapter (rankwise or PEFT LoRA) into its base model and
write a plain transformers model folder (``config.json`` + ``model.safetensors``, and the base's tokenizer when it
has one)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from ..atomic import dir_mode
from ..errors import RankwiseError
from ..paths import check_out_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model", description=__doc__)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="new folder for the merged model")
    p.add_argument("--base", help="base model folder (or preset); default: the adapter's base_model_name_or_path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import adapters
    from ..data.tokenizer import has_tokenizer
    from ..models import PRESETS, build_model, is_run, model_tokenizer

    check_out_dir(args.out)
    config = adapters.read_config(args.adapter)
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        raise RankwiseError("the adapter does not name its base model; pass --base MODEL_DIR")
    if base not in PRESETS and not os.path.isdir(base):
        raise RankwiseError(f"base model {base!r} is neither a folder nor a preset; pass --base MODEL_DIR")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankwiseError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    model = build_model(base)
    adapters.load_adapter(model, args.adapter)
    adapters.merge_and_unload(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(dir_mode())  # mkdtemp's 0700 -> what mkdir gives under the umask
    try:
        model.save_pretrained(tmp)
        if is_run(base) or has_tokenizer(base):  # the base's tokenizer travels with the merged weights
            model_tokenizer(base).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {args.adapter} into {base}: wrote {out}")
    return 0
