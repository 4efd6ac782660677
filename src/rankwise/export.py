"""Export a finished run: its adapter in PEFT's format, or the merged model as a plain transformers folder.

    rankwise export RUN --adapter DIR        # adapter_config.json + adapter_model.safetensors (peft loads it)
    rankwise export RUN --merged DIR         # config.json + model.safetensors (+ tokenizer), W <- W + Delta W

Every adapter run also writes ``RUN/adapter/`` when it finishes (``save_run_adapter``, called by ``train``).

A quantized base (``--quantize nf4|int8``) is merged as ``W = deq(Q) + Delta W``, computed in fp32 and written in
bf16 by default (``dtype``), so the merged folder loads in plain transformers without torchao. Each folder is
written to a temporary sibling and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .atomic import dir_mode
from .errors import RankwiseError

log = logging.getLogger("rankwise")
ADAPTER_DIR = "adapter"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_run_adapter(model: nn.Module, run_dir: str | os.PathLike, base: str | None) -> Path | None:
    """Write ``run_dir/adapter/`` (PEFT format) if ``model`` carries adapters; None otherwise.

    A model sharded by FSDP holds its adapters as shards here; ``rankwise export RUN --adapter DIR`` writes them from
    the checkpoint instead."""
    from .adapters import adapter_layers, save_adapter

    layers = adapter_layers(model)
    if not layers:
        return None
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        log.warning("adapters are sharded (FSDP): not writing %s/%s; run `rankwise export %s --adapter DIR`",
                    run_dir, ADAPTER_DIR, run_dir)
        return None
    names = {n for layer in layers.values() for n in layer.active}
    name = "default" if "default" in names or not names else sorted(names)[0]
    with staged(Path(run_dir) / ADAPTER_DIR, replace=True) as tmp:
        save_adapter(model, tmp, name, base_model_name_or_path=base)
    return Path(run_dir) / ADAPTER_DIR


def check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankwiseError(f"{str(out)!r} exists and is not an empty folder; choose a new folder")


@contextmanager
def staged(out: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` when the block succeeds (removed if it fails)."""
    if not replace:
        check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(dir_mode())  # mkdtemp's 0700 -> what mkdir gives under the umask
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The training config a run wrote (``train_config.json``, ``config.json`` in older runs), readable without
    unpickling the checkpoint."""
    from . import checkpoint as ckpt
    from .models import TRAIN_CONFIG

    run = Path(run_dir)
    if not (run / ckpt.CHECKPOINT_FILE).is_file():
        raise RankwiseError(f"{str(run)!r} is not a run folder (no {ckpt.CHECKPOINT_FILE}); pass the --out folder of "
                            "`rankwise train`")
    for name in (TRAIN_CONFIG, "config.json"):
        try:
            d = json.loads((run / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "method" in d:
            return d
    return {}


def load_run(run_dir: str | os.PathLike, device: str = "cpu"):
    """(model as trained: adapters attached, base quantized if it was; the run's ``TrainConfig``; its tokenizer)."""
    from . import checkpoint as ckpt
    from .train import load_run as load_train_run

    if run_config(run_dir).get("quantize"):  # before unpickling: the checkpoint holds torchao tensors
        from .quant import require_torchao

        require_torchao("this run has a quantized base; reading it")
    state = ckpt.load(run_dir)
    cfg = state["config"]
    base = cfg.get("model") or cfg.get("preset")
    if base and os.path.isdir(base) and not os.path.isfile(os.path.join(base, "config.json")):
        raise RankwiseError(f"the run's model folder {base!r} has no config.json; restore the transformers "
                            "model folder the run was trained from")
    run = load_train_run(str(run_dir), device, state)
    run.model.eval()
    return run.model, run.config, run.tokenizer


def merged_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into the base, in place, and return a plain transformers model in ``dtype``
    (default: the base's; bf16 for a quantized base). Quantized layers are dequantized to fp32 first."""
    from .adapters import merge_and_unload
    from .quant import dequantize_base, quantized_layers

    quantized = bool(quantized_layers(model))
    if quantized:
        dequantize_base(model, torch.float32)
    merge_and_unload(model)
    dtype = dtype or (torch.bfloat16 if quantized else next(model.parameters()).dtype)
    model = model.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model


def export_merged(run_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                  device: str = "cpu", requantize: str | None = None) -> Path:
    """``rankwise export RUN --merged DIR``: a transformers folder (safetensors) + tokenizer when available.

    ``requantize="int8"`` writes the merged weights re-quantized (torchao int8 weight-only, through transformers'
    ``TorchAoConfig``; loading it needs torchao). NF4 cannot be written: transformers does not serialize it."""
    if dtype is not None and dtype not in DTYPES:
        raise RankwiseError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if requantize is not None:
        if requantize != "int8":
            raise RankwiseError(f"--requantize {requantize!r} cannot be written: transformers saves torchao's int8 "
                                "but not its NF4 tensors; use --requantize int8, or the bf16 merge and quantize when "
                                "loading (e.g. bitsandbytes load_in_4bit)")
        from .quant import require_torchao

        require_torchao("--requantize")
    out = Path(out)
    check_new_folder(out)  # before the (slow) load
    model, _, tokenizer = load_run(run_dir, device)
    from .adapters import adapter_layers

    if not adapter_layers(model):
        raise RankwiseError(f"the run in {str(run_dir)!r} has no adapter to merge (method full or a reparameterization:"
                            " its checkpoint is already the model)")
    model = merged_model(model, DTYPES[dtype] if dtype else None)
    with staged(out) as tmp:
        if requantize:
            dense = tmp / ".merged"
            model.save_pretrained(str(dense), safe_serialization=True)
            model = _requantized(dense, model.dtype)
            shutil.rmtree(dense)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def _requantized(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The merged folder reloaded with torchao int8 weight-only quantization (transformers' own path)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def export_adapter(run_dir: str | os.PathLike, out: str | os.PathLike, device: str = "cpu") -> Path:
    """``rankwise export RUN --adapter DIR``: the run's adapter in PEFT's format."""
    from .adapters import adapter_layers, save_adapter

    out = Path(out)
    check_new_folder(out)
    model, cfg, _ = load_run(run_dir, device)
    if not adapter_layers(model):
        raise RankwiseError(f"the run in {str(run_dir)!r} has no adapter (method {cfg.method!r})")
    with staged(out) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=cfg.model or cfg.preset)
    return out
