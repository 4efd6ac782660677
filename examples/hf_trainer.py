"""Fine-tune a tiny LLaMA with ``transformers.Trainer`` and a rankwise method (offline: the stdlib-docs corpus).

    python examples/hf_trainer.py --method galore --rank 32 --steps 100
    python examples/hf_trainer.py --method lora --rank 8 --steps 100 --lr 3e-3
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset, Subset


class TokenWindows(Dataset):
    """Consecutive (seq_len)-token windows of a token array, as causal-LM examples (labels = inputs)."""

    def __init__(self, tokens, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype("int64"))
        return {"input_ids": ids, "labels": ids}


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    from rankwise.data import prepare
    from rankwise.integrations.hf import rankwise_setup
    from rankwise.models import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="galore")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows evaluated before and after")
    p.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    a = p.parse_args(argv)

    corpus = prepare()
    model = build_model("tiny", vocab_size=corpus.vocab_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=a.out or tmp, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                                 per_device_eval_batch_size=a.batch_size, learning_rate=a.lr,
                                 warmup_steps=max(1, a.steps // 10), logging_steps=max(1, a.steps // 10),
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        setup = rankwise_setup(model, a.method, args, rank=a.rank)
        trainer = Trainer(model=setup.model, args=args, train_dataset=TokenWindows(corpus.train, a.seq_len),
                          eval_dataset=Subset(TokenWindows(corpus.val, a.seq_len), range(a.eval_windows)),
                          optimizers=setup.optimizers,
                          callbacks=setup.callbacks)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    print(f"{a.method}: eval loss {before:.4f} -> {after:.4f}")
    return {"before": before, "after": after, "setup": setup}


if __name__ == "__main__":
    main()
