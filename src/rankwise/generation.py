"""Sampling text from a trained model with its own tokenizer (``rankwise generate``).

The prompt starts a document: its ids follow the end-of-text token, as every document did in training (unless the
tokenizer itself begins the prompt with its BOS token). Each step feeds the new token with the key/value cache and
draws the next one from ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded by ``seed``
(``temperature = 0``: the argmax). Generation stops at the end-of-text token, after ``max_new_tokens``, or at the
model's last position.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import RankwiseError
from .models import max_positions


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the decoded new tokens (special tokens skipped)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is not None and ids and ids[0] == bos else [tokenizer.eos_token_id, *ids]


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The argmax of ``logits`` (1-D) when ``temperature == 0``, else a draw from ``softmax(logits / T)``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 50, temperature: float = 1.0,
             seed: int = 0) -> Generation:
    """Continue ``prompt`` with ``model`` (see the module docstring for the rule)."""
    if max_new_tokens < 0:
        raise RankwiseError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise RankwiseError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    ids = prompt_ids(tokenizer, prompt)
    limit = max_positions(model)
    if limit is not None and len(ids) >= limit:
        raise RankwiseError(f"the prompt has {len(ids)} tokens; the model takes at most {limit - 1} before "
                            "generating: shorten it")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # transformers 5 names the key/value cache `cache` (`past_key_values` before)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    new: list[int] = []
    inputs, past = torch.tensor([ids], device=device), None
    while len(new) < max_new_tokens and (limit is None or len(ids) + len(new) < limit):
        out = model(input_ids=inputs, use_cache=True, **({key: past} if past is not None else {}))
        past = getattr(out, key)
        token = next_token(out.logits[0, -1], temperature, generator)
        new.append(token)
        if token == tokenizer.eos_token_id:
            break
        inputs = torch.tensor([[token]], device=device)
    model.train(was_training)
    return Generation(ids, new, tokenizer.decode(new, skip_special_tokens=True))
