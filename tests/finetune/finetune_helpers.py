"""Small pretrained-style models, a local text corpus and quick adapter runs shared by the fine-tuning tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rankwise.models import build_model
from rankwise.train import TrainConfig, train

VOCAB = 512
WORDS = ("alpha beta gamma delta model train weight rank adapter merge export quantize block scale token layer "
         "value error loss step data").split()


def small_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA (hidden 64, ffn 128, vocab 512): every matrix a multiple of 64 weights."""
    return build_model("tiny", vocab_size=VOCAB, seed=seed, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4).eval()


def save_tokenizer(path: Path) -> None:
    """A BPE of 300 tokens over ``WORDS`` saved in ``path``, as a hub model folder has its tokenizer (rankwise
    tokenizes with a folder's own tokenizer)."""
    from rankwise.data.tokenizer import as_transformers, save_pretrained_tokenizer, train_tokenizer

    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(60)]
    save_pretrained_tokenizer(as_transformers(train_tokenizer(docs, 300)), path)


def model_folder(path: Path, seed: int = 0) -> str:
    """A saved pretrained-style model with its own tokenizer."""
    small_model(seed).save_pretrained(str(path))
    save_tokenizer(path)
    return str(path)


def text_corpus(path: Path, docs: int = 60) -> str:
    """A .jsonl corpus of pseudo-sentences (enough documents for a train / validation split)."""
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(120))}) for _ in range(docs)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def quick_run(out: Path, model_dir: str, data: str, **overrides) -> object:
    """A 4-step LoRA run (r=4, every linear) on ``model_dir`` writing ``out``."""
    base = dict(preset=model_dir, data=data, vocab_size=300, method="lora",
                method_options={"r": 4, "alpha": 8, "target": "all-linear"}, steps=4, batch_size=4, seq_len=32,
                lr=2e-2, warmup_steps=0, dtype="fp32", eval_every=0, eval_batches=1, checkpoint_every=0,
                quiet=True, out=str(out))
    return train(TrainConfig(**{**base, **overrides}))


def tokens(batch: int = 2, length: int = 16, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=x).logits.float()
