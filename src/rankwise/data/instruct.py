"""Instruction data: ``.jsonl`` rows of ``{"prompt", "completion"}`` or chat ``{"messages": [{"role", "content"}]}``,
tokenized with the loss masked on the prompt.

The format is detected from the rows (every row of a file or folder must have the same one; plain ``{"text"}``
rows are text data). Rendering:

- with a chat template (``tokenizer.chat_template``): ``apply_chat_template`` of the conversation (a prompt /
  completion row is ``[user: prompt, assistant: completion]``). Assistant message ``i`` spans the characters between
  the rendering of ``messages[:i]`` with ``add_generation_prompt=True`` and the rendering of ``messages[:i+1]``
  (the template's end-of-turn tokens included), as TRL's ``assistant_only_loss`` does; a template that does not
  render conversations incrementally (each prefix a prefix of the whole) is refused;
- without one: ``prompt + completion``, and chats as lines ``"{role}: {content}\\n"`` with the assistant contents
  (and their line breaks) trained.

The whole text is tokenized once (offsets mapping) and a token is trained iff it starts inside a trained span, so
prompt and completion are tokenized as they are at inference. The end-of-text token follows each example and is
trained (the model learns to stop). Masks are per token: ``mask[j] = 1`` when token ``j`` is a loss target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RankwiseError
from .sources import read_utf8

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("prompt-completion", "chat")


def _files(source: str) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        return sorted(f for f in p.rglob("*.jsonl"))
    return [p] if p.is_file() and p.suffix == ".jsonl" else []


def _rows(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for i, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise RankwiseError(f"{path}:{i}: not valid JSON ({e.msg}); .jsonl files need one JSON object per line")
    return rows


def _row_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt-completion"
    return "text" if "text" in row else None


def detect_format(source: str) -> str | None:
    """``"prompt-completion"`` or ``"chat"`` when the local ``.jsonl`` source holds instruction rows (judged by its
    first row), ``None`` otherwise (text data, a builtin or hub source)."""
    for f in _files(source):
        for _, row in _rows(f)[:1]:
            kind = _row_format(row)
            return kind if kind in FORMATS else None
    return None


def _check_row(path: Path, line: int, row: Any, kind: str) -> dict[str, Any]:
    where = f"{path}:{line}"
    got = _row_format(row)
    if got != kind:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise RankwiseError(f"{where}: expected a {kind} row like the file's first one "
                            f"({'{prompt, completion}' if kind == 'prompt-completion' else '{messages: [...]}'}), "
                            f"got {keys}; every row of instruction data must have the same format")
    if kind == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise RankwiseError(f"{where}: missing or non-string {key!r} (a prompt-completion row needs string "
                                    "'prompt' and 'completion')")
        if not row["completion"]:
            raise RankwiseError(f"{where}: empty 'completion': there is nothing to train on")
        return row
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RankwiseError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise RankwiseError(f"{where}: message {k} needs a 'role' and a string 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise RankwiseError(f"{where}: message {k} has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RankwiseError(f"{where}: no assistant message: there is nothing to train on")
    return row


def read_examples(source: str) -> tuple[str, list[dict[str, Any]]]:
    """(format, rows) of an instruction ``.jsonl`` file or folder, every row checked (errors name file and line)."""
    kind = detect_format(source)
    if kind is None:
        raise RankwiseError(f"{source!r} holds no instruction rows ({{prompt, completion}} or {{messages}})")
    rows = [_check_row(f, i, row, kind) for f in _files(source) for i, row in _rows(f)]
    return kind, rows


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def render(tok: Any, row: dict[str, Any]) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, trained character spans, whether the text came from the chat template)."""
    if getattr(tok, "chat_template", None):
        messages = conversation(row)
        full = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tok.apply_chat_template(messages[:i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
                raise RankwiseError("the tokenizer's chat template does not render a conversation incrementally (the "
                                    "rendering of its first messages is not a prefix of the whole), so the assistant "
                                    "turns cannot be located; use prompt/completion rows or a tokenizer without "
                                    "chat_template")
            spans.append((len(before), len(upto)))
        return full, spans, True
    if "messages" not in row:
        return row["prompt"] + row["completion"], [(len(row["prompt"]), len(row["prompt"]) + len(row["completion"]))], False
    text, spans = "", []
    for m in row["messages"]:
        head = f"{m['role']}: "
        if m["role"] == "assistant":
            spans.append((len(text) + len(head), len(text) + len(head) + len(m["content"]) + 1))
        text += head + m["content"] + "\n"
    return text, spans, False


def tokenize(tok: Any, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each row; the end-of-text token is appended (trained) unless already last."""
    out = []
    eos = tok.eos_token_id
    for row in rows:
        text, spans, templated = render(tok, row)
        enc = tok(text, add_special_tokens=not templated, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        mask = [int(e > s and any(a <= s < b for a, b in spans)) for s, e in enc["offset_mapping"]]
        if not ids or ids[-1] != eos:
            ids.append(eos)
            mask.append(1)
        else:
            mask[-1] = 1
        out.append((ids, mask))
    return out


def flatten(examples: list[tuple[list[int], list[int]]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated ids, masks (uint8) and each example's start offset (int64, plus the total at the end)."""
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for e, _ in examples for t in e), dtype=dtype, count=int(starts[-1]))
    mask = np.fromiter((t for _, m in examples for t in m), dtype=np.uint8, count=int(starts[-1]))
    return ids, mask, starts
