"""Pure tokenization for the training jobs: no Ray, no DeepSpeed, unit-tested in milliseconds.

* SFT rows (TRL conversational ``messages``) → ``input_ids`` + ``labels`` where every token
  outside an assistant turn is ``IGNORE_INDEX``. Assistant spans are found by rendering the
  chat template on prefixes of the conversation (``messages[:i]`` with the generation prompt
  ends where turn ``i`` starts; ``messages[:i+1]`` ends where it stops), then mapping those
  character spans onto tokens with the tokenizer's offsets — robust to BPE merges at the
  boundaries. The end-of-turn token is trained; whitespace after it is not.
* Preference rows (``prompt`` messages, ``chosen``/``rejected`` as text or message lists,
  ``p_chosen``) → the two conversations tokenized the same way, labels on the answer only.
* Truncation keeps the first ``max_length`` tokens. A row whose answer would be cut off
  entirely is *dropped* with a reason, and ``tokenize_rows`` counts every drop.
* ``collate_*`` pad on the right; ``length_grouped_batches`` sorts within windows of batches
  by length (less padding) while keeping the batch order random.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from training.losses import IGNORE_INDEX
from workflows.core.errors import DataError, RowError

GROUP_WINDOW_BATCHES = 32  # batches per length-sorting window


@dataclass
class Example:
    """One tokenized SFT conversation."""

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Pair:
    """One tokenized preference pair; ``extra`` carries per-pair values (e.g. reference logprobs)."""

    id: str
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    p_chosen: float = 1.0
    truncated: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


# ---------------------------------------------------------------- chat template → labels

def _render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tok, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns at index ≥ ``first``."""
    if not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template — train from an instruct model (e.g. `embedded`) "
                        "or a directory whose tokenizer_config.json carries one")
    text = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        head, upto = _render(tok, messages[:i], True), _render(tok, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            raise DataError("the chat template renders a conversation differently from its prefixes, so the "
                            "assistant tokens cannot be located — use a model with a prefix-stable template "
                            "(ChatML, Llama 3, ...)")
        start, end = len(head), len(upto)
        while end > start and upto[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tok, messages: list[dict], max_length: int, first: int = 0
                          ) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)``; labels keep the assistant turns at index ≥ ``first``.
    Raises ``RowError`` when no answer token survives ``max_length`` (or there is no answer)."""
    text, spans = assistant_spans(tok, messages, first)
    if not spans:
        raise RowError("no_assistant_turn", "the conversation has no assistant turn to train on")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for j, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and e > spans[k][0] and s < spans[k][1]:
            labels[j] = ids[j]
    if all(x == IGNORE_INDEX for x in labels):
        raise RowError("empty_response", "the answer is empty")
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise RowError("response_truncated", f"the prompt fills max_length={max_length}; no answer token is left")
    return ids, labels, truncated


def _messages(value: Any, role: str, what: str) -> list[dict]:
    """A text cell or a list of {role, content} messages → a message list."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_response" if role == "assistant" else "empty_prompt", f"{what} is empty")
        return [{"role": role, "content": value}]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in value]
    raise RowError("bad_messages", f"{what} is neither text nor a list of {{role, content}} messages")


def tokenize_sft(tok, row: dict, max_length: int) -> Example:
    msgs = _messages(row.get("messages"), "user", "messages")
    ids, labels, cut = tokenize_conversation(tok, msgs, max_length)
    return Example(str(row.get("prompt_id") or row.get("id") or ""), ids, labels, cut)


def tokenize_preference(tok, row: dict, max_length: int) -> Pair:
    prompt = _messages(row.get("prompt"), "user", "prompt")
    sides = []
    for name in ("chosen", "rejected"):
        answer = _messages(row.get(name), "assistant", name)
        sides.append(tokenize_conversation(tok, prompt + answer, max_length, first=len(prompt)))
    p = row.get("p_chosen")
    p = 1.0 if p is None else float(p)
    if not 0.0 <= p <= 1.0:
        raise RowError("bad_label", f"p_chosen={p} is not a probability")
    (ci, cl, cc), (ri, rl, rc) = sides
    return Pair(str(row.get("pair_id") or row.get("id") or ""), ci, cl, ri, rl, p, cc or rc)


def tokenize_rows(fn: Callable, tok, rows: Iterable[dict], max_length: int) -> tuple[list, dict[str, int]]:
    """Tokenize every row with ``fn``; returns the kept items and ``{"dropped:<reason>": n,
    "truncated": n}`` — nothing is dropped without being counted."""
    items, counts = [], {"truncated": 0}
    for row in rows:
        try:
            item = fn(tok, row, max_length)
        except RowError as e:
            key = f"dropped:{e.reason}"
            counts[key] = counts.get(key, 0) + 1
            continue
        counts["truncated"] += int(item.truncated)
        items.append(item)
    return items, counts


# ---------------------------------------------------------------- batches

def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate_sft(items: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding = IGNORE_INDEX)."""
    ids = [x.input_ids for x in items]
    return {"input_ids": pad_right(ids, pad_id), "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
            "labels": pad_right([x.labels for x in items], IGNORE_INDEX)}


def collate_pairs(items: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows: the B chosen sequences, then the B rejected ones, right-padded to
    a common length; ``p_chosen`` ``[B]`` and every ``extra`` key as a ``[B]`` float tensor."""
    ids = [x.chosen_ids for x in items] + [x.rejected_ids for x in items]
    batch = {"input_ids": pad_right(ids, pad_id), "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
             "labels": pad_right([x.chosen_labels for x in items] + [x.rejected_labels for x in items], IGNORE_INDEX),
             "p_chosen": torch.tensor([x.p_chosen for x in items], dtype=torch.float32)}
    for key in items[0].extra:
        batch[key] = torch.tensor([x.extra[key] for x in items], dtype=torch.float32)
    return batch


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: bool = True) -> list[list[int]]:
    """Indices cut into ``ceil(n / batch_size)`` batches: shuffled (seeded), then, if ``group``,
    sorted by length within windows of ``GROUP_WINDOW_BATCHES`` batches; batch order shuffled."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * (GROUP_WINDOW_BATCHES if group else 1)
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i]) if group else order[s:s + window]
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def is_eval(row_id: str, fraction: float, seed: int = 0) -> bool:
    """Stable held-out split: a row is in eval iff a hash of (seed, id) falls under ``fraction``."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction
