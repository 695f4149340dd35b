"""Human preference data and the ``preferences`` schema shared by AI and human labels.

``PREFERENCES_SCHEMA`` is TRL's *conversational preference* format plus our bookkeeping:
``prompt`` is a list of ``{role, content}`` messages ending in a user turn, ``chosen`` and
``rejected`` are one-message lists ``[{"role": "assistant", "content": ...}]`` — what
TRL's ``DPOTrainer`` / ``RewardTrainer`` load directly (they apply the chat template
themselves). Extra columns: ``pair_id``, ``prompt_id``, ``p_chosen`` (soft label, ≥ 0.5),
``principle_ids``, ``judge``, ``order_agreement`` (null when no order test was run, as for
human labels) and ``source`` (``"ai"`` or ``"human"``).

``load_human(path)`` reads HH-RLHF transcripts (``chosen``/``rejected`` full transcripts
sharing a prompt) or generic ``prompt``/``chosen``/``rejected`` columns (strings, message
lists, or their JSON text; ``prompt`` may be absent when ``chosen``/``rejected`` are full
conversations) from .jsonl/.json/.csv/.parquet (local or s3://) or a saved HF dataset dir.
Bad rows become errors ``{id: "<file>:<row>", stage, reason, detail}`` with reasons
missing_field, bad_json, bad_hh_transcript, bad_messages, empty_prompt, empty_response,
prompt_mismatch, identical_responses, duplicate_pair.

``mix(ai_rows, human_rows, human_ratio, seed)`` is the explicit helpful/harmless weighting.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.errors import ConfigError, DataError, RowError
from workflows.core.pairwise import pair_id
from workflows.prompt_sources import parse_hh_transcript, prompt_id, split_hh_prompt_response

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PREFERENCES_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("prompt", MESSAGES),
    ("chosen", MESSAGES), ("rejected", MESSAGES), ("p_chosen", pa.float64()),
    ("principle_ids", pa.list_(pa.string())), ("judge", pa.string()),
    ("order_agreement", pa.bool_()), ("source", pa.string()),
])
ROLES = ("system", "user", "assistant")


def preference_row(prompt: list[dict], chosen: str, rejected: str, p_chosen: float, *,
                   principle_ids: list[str] = (), judge: str, order_agreement: bool | None,
                   source: str) -> dict:
    """One row of ``PREFERENCES_SCHEMA``; ids are derived from the content."""
    pid = prompt_id(prompt)
    return {"pair_id": pair_id(pid, chosen, rejected), "prompt_id": pid,
            "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": float(p_chosen), "principle_ids": list(principle_ids), "judge": judge,
            "order_agreement": order_agreement, "source": source}


def text_of(turns: list[dict]) -> str:
    """The content of a ``chosen``/``rejected`` cell (its last message)."""
    return turns[-1]["content"]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA)


# ---------------------------------------------------------------- row parsing

def _messages(value: Any, field: str) -> list[dict]:
    """A message list (already decoded by ``_decode``); roles checked, contents kept."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError("bad_messages", f"{field!r}: expected a non-empty list of {{role, content}}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowError("bad_messages", f"{field!r} turn {k}: expected {{role: user|assistant|system, content: str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _decode(value: Any) -> Any:
    """JSON text of a message list (as CSV cells hold it) → the list; anything else unchanged,
    so a plain answer that merely starts with "[" stays text."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _conversation(value: Any, field: str) -> list[dict]:
    """A full conversation (HH transcript or messages) ending in an assistant turn."""
    value = _decode(value)
    try:
        msgs = parse_hh_transcript(value) if isinstance(value, str) else _messages(value, field)
    except RowError as e:
        raise RowError(e.reason, e.detail if e.detail.startswith(repr(field)) else f"{field!r}: {e.detail}") from None
    if msgs[-1]["role"] != "assistant":
        raise RowError("bad_messages", f"{field!r} does not end with an assistant turn")
    return msgs


def _prompt(value: Any) -> list[dict]:
    value = _decode(value)
    if _is_hh(value):
        return split_hh_prompt_response(value)[0]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    msgs = _messages(value, "prompt")
    if msgs[-1]["role"] != "user":
        raise RowError("bad_messages", "'prompt' must end with a user turn")
    return msgs


def _response(value: Any, field: str) -> str:
    value = _decode(value)
    if isinstance(value, str):
        return value
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise RowError("bad_messages", f"{field!r}: the last message must be the assistant's answer")
    return msgs[-1]["content"]


def _implicit(record: dict) -> tuple[list[dict], str, str]:
    """No ``prompt`` column: chosen/rejected are full conversations sharing their prompt."""
    if not any(_is_hh(record[f]) or isinstance(_decode(record[f]), list) for f in ("chosen", "rejected")):
        raise RowError("missing_field", "no 'prompt', and 'chosen'/'rejected' are plain answers, not conversations")
    c, r = _conversation(record["chosen"], "chosen"), _conversation(record["rejected"], "rejected")
    if c[:-1] != r[:-1]:
        raise RowError("prompt_mismatch", "'chosen' and 'rejected' do not share the same conversation before the answer")
    if not any(m["role"] == "user" for m in c[:-1]):
        raise RowError("empty_prompt", "no user turn before the answers")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def human_row(record: dict) -> dict:
    """One input record → a ``preferences`` row (source human, p_chosen 1.0), or ``RowError``."""
    if not isinstance(record, dict):
        raise RowError("bad_json", f"expected an object per row, got {type(record).__name__}")
    for f in ("chosen", "rejected"):
        if record.get(f) is None:
            raise RowError("missing_field", f"no {f!r} (columns: {', '.join(map(str, record))})")
    if record.get("prompt") is None:
        prompt, chosen, rejected = _implicit(record)
    else:
        prompt = _prompt(record["prompt"])
        chosen, rejected = _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    if not prompt[-1]["content"].strip():
        raise RowError("empty_prompt", "the last user turn is empty")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError("empty_response", f"{name!r} answer is empty")
    if chosen.strip() == rejected.strip():
        raise RowError("identical_responses", "chosen and rejected answers are the same text")
    return preference_row(prompt, chosen, rejected, 1.0, judge="human", order_agreement=None, source="human")


# ---------------------------------------------------------------- files

_BATCH = 1024  # records per batch read from a parquet file or a saved Hugging Face dataset


def _hf_records(path: str, split: str) -> Iterator[dict]:
    """A saved Hugging Face dataset (memory-mapped Arrow) in batches: a batch of records in memory."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(path, f"no split {split!r} (splits: {', '.join(ds)})", f"pass split={next(iter(ds))!r}")
        ds = ds[split]
    for batch in ds.iter(batch_size=_BATCH):  # the same python values as iterating row by row
        names = list(batch)
        yield from (dict(zip(names, values)) for values in zip(*(batch[n] for n in names)))


def _json_lines(f) -> Iterator[Any]:
    """JSON lines, one record per non-blank line (a line that is not JSON: a ``bad_json`` RowError)."""
    for raw in f:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RowError("bad_json", f"not UTF-8 text: {e}")
            continue
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as e:
                yield RowError("bad_json", str(e))


def _starts_array(f: io.BufferedReader) -> bool:
    """Whether the stream's first non-blank byte is ``[`` (a .json file holding one array); leading
    whitespace is consumed, which changes neither reading."""
    while True:
        head = f.peek(1)[:1]
        if not head or not head.isspace():
            return head == b"["
        f.read(1)


def _file_records(uri: str) -> Iterator[Any]:
    """Records of a file, streamed: JSON lines line by line, CSV row by row, parquet by batches of
    a row group; a .json array is one document and is read whole. ``.gz`` files are decompressed."""
    ext = Path(uri.removesuffix(".gz")).suffix.lower()
    if ext not in (".parquet", ".csv", ".json", ".jsonl"):
        raise ConfigError(uri, f"unsupported file type {ext or '(none)'!r}",
                          "use .jsonl, .json, .csv, .parquet or a saved Hugging Face dataset directory")
    fs, path = storage.resolve(uri)
    if ext == ".parquet":
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=_BATCH):
            yield from batch.to_pylist()
        return
    with io.BufferedReader(fs.open_input_stream(path, compression="detect"), buffer_size=1 << 20) as f:
        if ext == ".csv":
            csv.field_size_limit(2**31 - 1)  # a long answer is one cell
            yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        elif ext == ".json" and _starts_array(f):
            yield from json.loads(f.read().decode("utf-8"))
        else:
            yield from _json_lines(f)


def _records(path: str, split: str) -> Iterator[Any]:
    """Every record of ``path`` in order, streamed (see ``_file_records``)."""
    if not storage.is_remote(path) and os.path.isdir(path):
        return _hf_records(path, split)
    if not storage.exists(path):
        raise ConfigError(path, "file not found", "check the path of the human preference data")
    return _file_records(path)


def load_human(path: str, split: str = "train", limit: int | None = None,
               stage: str = "human") -> tuple[list[dict], list[dict]]:
    """Human preference rows and error rows ``{id, stage, reason, detail}`` from ``path``.
    Ids of errors are ``"<file name>:<0-based record index>"``. A pair seen twice keeps
    its first row; later ones are ``duplicate_pair`` errors."""
    name = os.path.basename(str(path).rstrip("/")) or str(path)
    rows, errors, seen = [], [], {}
    for i, rec in enumerate(_records(str(path), split)):
        if limit is not None and i >= limit:
            break
        try:
            if isinstance(rec, RowError):
                raise rec
            row = human_row(rec)
            if row["pair_id"] in seen:
                raise RowError("duplicate_pair", f"same prompt and answers as record {seen[row['pair_id']]}")
            seen[row["pair_id"]] = i
            rows.append(row)
        except RowError as e:
            errors.append({"id": f"{name}:{i}", "stage": stage, "reason": e.reason, "detail": e.detail})
    return rows, errors


def require_rows(rows: list[dict], errors: list[dict], where: str, what: str = "human pair") -> list[dict]:
    """``rows``, or a ``ConfigError`` naming the file's first bad row when not one row was usable
    (a file of the wrong shape is a mistake to fix, not a file of bad rows to skip)."""
    if not rows:
        first = f"; first problem: {errors[0]['id']}: {errors[0]['reason']} {errors[0]['detail']}" if errors else ""
        raise ConfigError(where, f"no usable {what} in {len(errors)} row(s){first}",
                          "give prompt, chosen and rejected per row (or HH chosen/rejected transcripts)")
    return rows


# ---------------------------------------------------------------- mixing

def mix_plan(n_ai: int, given: dict[str, tuple[int, float]]) -> dict[str, int]:
    """Rows kept per source so that each given source ``name: (rows, ratio)`` makes ``ratio`` of
    the output and AI labels the rest (1 − Σ ratios), rounded to whole rows: the largest total every
    source can fill, so the scarcest source (relative to its share) is used whole and the others
    subsampled. Returns ``{"ai": k, name: k, ...}``."""
    for name, (_, r) in given.items():
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"{name}_ratio", f"got {r}", "use a fraction between 0 and 1")
    r_ai = 1.0 - sum(r for _, r in given.values())
    if r_ai < -1e-9:
        raise ConfigError("ratio", f"the given sources' ratios add up to {1 - r_ai:g}", "make them add up to at most 1")
    shares = {"ai": (n_ai, max(r_ai, 0.0)), **given}
    used = {k: v for k, v in shares.items() if v[1] > 1e-12}
    if not used:
        return {k: 0 for k in shares}
    if len(used) > 1 and any(n == 0 for n, _ in used.values()):
        missing = next("AI" if k == "ai" else k for k, (n, _) in used.items() if n == 0)
        others = " and ".join("AI" if k == "ai" else k for k in used)
        raise DataError(f"the mix asks for {others} rows, but there are no {missing} rows")
    total = min(n / r for n, r in used.values())
    return {k: (min(n, round(r * total)) if k in used else 0) for k, (n, r) in shares.items()}


def mix_counts(n_ai: int, n_human: int, human_ratio: float) -> tuple[int, int]:
    """(ai kept, human kept) so that human / total == human_ratio (``mix_plan`` with one given
    source): all of the scarcer side is used and the other side is subsampled."""
    plan = mix_plan(n_ai, {"human": (n_human, human_ratio)})
    return plan["ai"], plan["human"]


def _subsample(rows: list[dict], k: int, seed: int, salt: str) -> list[dict]:
    digest = hashlib.sha256(f"mix:{salt}:{seed}".encode("utf-8")).digest()
    idx = sorted(random.Random(int.from_bytes(digest[:8], "big")).sample(range(len(rows)), k))
    return [rows[i] for i in idx]


def mix(ai_rows: list[dict], human_rows: list[dict], human_ratio: float, seed: int = 0) -> tuple[list[dict], dict]:
    """AI and human preference rows in a fixed proportion: ``human_ratio`` is the fraction
    of the output that is human (0 → AI only, 1 → human only).

    Counts (``mix_counts``): keep every row of the scarcer side and subsample the other
    without replacement, deterministically per ``seed``, keeping input order; output is
    the kept AI rows, then the kept human rows. An AI row whose pair_id also has a human
    label is dropped first (the human label wins). Returns (rows, report) where report
    has the counts in/kept, the actual ratio and the pair_ids that were left out."""
    human_ids = {r["pair_id"] for r in human_rows}
    overridden = [r["pair_id"] for r in ai_rows if r["pair_id"] in human_ids]
    ai = [r for r in ai_rows if r["pair_id"] not in human_ids]
    n_ai, n_h = mix_counts(len(ai), len(human_rows), human_ratio)
    ai_kept = _subsample(ai, n_ai, seed, "ai")
    human_kept = _subsample(human_rows, n_h, seed, "human")
    kept = {r["pair_id"] for r in ai_kept} | {r["pair_id"] for r in human_kept}
    total = n_ai + n_h
    report = {"human_ratio": human_ratio, "actual_human_ratio": n_h / total if total else 0.0,
              "ai_in": len(ai_rows), "ai_kept": n_ai, "human_in": len(human_rows), "human_kept": n_h,
              "ai_overridden_by_human": overridden,
              "ai_dropped": [r["pair_id"] for r in ai if r["pair_id"] not in kept],
              "human_dropped": [r["pair_id"] for r in human_rows if r["pair_id"] not in kept]}
    return [*ai_kept, *human_kept], report
