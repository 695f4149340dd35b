"""Prompt sources → the ``prompts`` dataset: ``prompt_id``, ``messages``, ``source``.

Shared by the stages: the ``prompts`` stage reads its input with it, the ``evaluate`` stage its
held-out sets, and the preference data readers use its ids and HH-RLHF transcript parsing.

Inputs: a file or directory (``.jsonl``/``.json``/``.csv``/``.parquet``, optionally
``.gz``), a saved Hugging Face dataset (``load_from_disk`` dir), ``hf:NAME[:CONFIG]``
(the hub, when reachable) or a shipped set: ``builtin:red_team|helpful|benign_edgy|all``.

Every input row yields exactly one output row (``RAW_SCHEMA``). Good rows have
``_error = None``; bad rows keep ``prompt_id = "row:" + _loc``, ``messages = []`` and a
reason: missing_field, empty_prompt, too_long, bad_messages, bad_hh_transcript, bad_json.
``_loc`` is ``"<file>:<row>"``, the 0-based record index in that file (CSV header and
blank JSONL lines are not records). ``source`` is ``cfg.source`` if set, else the row's
own non-empty ``source`` field (so a prompts dataset read back keeps its sources), else
the name of the file the row came from: its stem (``red_team`` for ``red_team.jsonl``;
in a directory, its path inside it without the extension, ``sub/part-0``; a directory of
shards is named as one with ``source:``), the HF dataset's name, or the builtin file's
name (``builtin:all`` is the shipped directory). Identical prompts get identical ids
(no dedup here).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from workflows.core.errors import ConfigError, DataError, RowError
from workflows.core.ids import ID_HEX

ROLES = ("system", "user", "assistant")
BUILTIN_DIR = Path(__file__).resolve().parent / "data"  # workflows/data
RAW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("source", pa.string()), ("_loc", pa.string()), ("_error", pa.string()), ("_detail", pa.string()),
])
_EXTS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_LIKELY_FIELDS = ("prompt", "messages", "chosen", "question", "instruction", "text", "input", "query")
_BLOCK_ROWS = 1024


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl")) + ["all"]


@dataclass
class PromptsConfig:
    path: str = "builtin:red_team"
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    field: str = "prompt"
    kind: Literal["auto", "text", "messages", "hh"] = "auto"
    split: str = "train"
    source: str | None = None
    limit: int | None = None       # the first N input rows, in file order (bad rows count)
    limit_per_file: int | None = None  # the first N rows of each file (a small trial of a mixed set)
    max_chars: int = 20000
    # a column carried along as each row's `_label` (iter_prompt_rows only: the evaluate stage's
    # sets labeled harmful or benign per row); a row without it is a `missing_label` error
    label_field: str | None = None

    def validate(self, where: str) -> None:
        """Reject bad combinations with a ConfigError naming ``where.<field>`` and the fix."""
        scheme = self.path.split(":", 1)[0] if ":" in self.path else ""
        builtins = ", ".join("builtin:" + n for n in builtin_names())
        checks = [
            ("path", not self.path.strip(), "is empty", "point it at a file, a directory, hf:NAME or builtin:red_team"),
            ("path", scheme == "builtin" and self.path[8:] not in builtin_names(),
             f"unknown builtin {self.path!r}", f"use one of {builtins}"),
            ("format", scheme in ("builtin", "hf") and self.format not in ("auto", {"builtin": "jsonl"}.get(scheme, "hf")),
             f"{self.format!r} does not fit {scheme}: paths", "leave format: auto"),
            ("field", not self.field.strip(), "is empty", "name the column that holds the prompt, e.g. field: prompt"),
            ("split", not self.split.strip(), "is empty", "e.g. split: train"),
            ("source", self.source is not None and not self.source.strip(), "is empty",
             "remove it (a name is derived from path) or give a name"),
            ("limit", self.limit is not None and self.limit <= 0, f"got {self.limit}",
             "use a positive number of rows, or null for all rows"),
            ("limit_per_file", self.limit_per_file is not None and self.limit_per_file <= 0,
             f"got {self.limit_per_file}", "use a positive number of rows per file, or null for all rows"),
            ("max_chars", self.max_chars <= 0, f"got {self.max_chars}", "use a positive number of characters"),
        ]
        for name, failed, problem, fix in checks:
            if failed:
                raise ConfigError(f"{where}.{name}", problem, fix)


# ---------------------------------------------------------------- pure row logic

def prompt_id(messages: list[dict]) -> str:
    """Stable id: sha256 of canonical JSON ``[[role, NFC(content)], ...]``, 24 hex chars (96 bits: at
    a billion prompts the chance that any two share an id is about 1 in 10^11; 64-bit ids, used
    before, collide with a 3 % chance there)."""
    pairs = [[m["role"], unicodedata.normalize("NFC", m["content"])] for m in messages]
    canon = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:ID_HEX]


_HH_SPLIT = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_START = re.compile(r"\s*Human:")


def parse_hh_transcript(text: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` → alternating user/assistant messages
    (contents stripped). A trailing empty ``Assistant:`` is dropped."""
    parts = _HH_SPLIT.split(text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise RowError("bad_hh_transcript", "no 'Human:' turn at the start of the transcript")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1] == ("Assistant", "") and len(turns) > 1:
        turns.pop()
    for k, (role, _) in enumerate(turns):
        if role != ("Human", "Assistant")[k % 2]:
            raise RowError("bad_hh_transcript", f"turn {k} is {role}:, expected turns to alternate Human:/Assistant:")
    return [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in turns]


def split_hh_prompt_response(text: str) -> tuple[list[dict], str]:
    """HH transcript → (turns up to and including the last user turn, the assistant
    answer after it or ``""``)."""
    msgs = parse_hh_transcript(text)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    return msgs[: last + 1], (msgs[last + 1]["content"] if last + 1 < len(msgs) else "")


def _as_messages(value: Any) -> list[dict]:
    """Check a list of ``{role, content}`` (or its JSON text); return clean copies."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("bad_messages", "a string that is not a JSON list of {role, content}") from None
    if not isinstance(value, (list, tuple)):
        raise RowError("bad_messages", f"expected a list of {{role, content}}, got {type(value).__name__}")
    if not value:
        raise RowError("empty_prompt", "empty message list")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise RowError("bad_messages", f"turn {k}: expected {{role: str, content: str}}, got {str(m)[:80]!r}")
        if m["role"] not in ROLES or (m["role"] == "system" and k > 0):
            raise RowError("bad_messages", f"turn {k}: role {m['role']!r} (use user/assistant; system only first)")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise RowError("bad_messages", f"last turn is {out[-1]['role']}; a prompt must end with a user turn")
    return out


def normalize_record(record: dict, cfg: PromptsConfig) -> list[dict]:
    """One input record → prompt messages (ending in a user turn), or ``RowError``."""
    if cfg.field not in record:
        raise RowError("missing_field", f"no {cfg.field!r} in this row (columns: {', '.join(map(str, record))})")
    value = record[cfg.field]
    if value is None:
        raise RowError("empty_prompt", f"{cfg.field!r} is null")
    kind = cfg.kind
    if kind == "auto":
        kind = "messages" if isinstance(value, (list, tuple)) else "text"
        if isinstance(value, str) and _HH_START.match(value):
            kind = "hh"
    if kind == "messages":
        msgs = _as_messages(value)
    elif not isinstance(value, str):
        raise RowError("bad_messages", f"expected text in {cfg.field!r}, got {type(value).__name__}")
    elif kind == "hh":
        msgs = split_hh_prompt_response(value)[0]
    else:
        msgs = [{"role": "user", "content": value}]
    if not msgs[-1]["content"].strip():
        raise RowError("empty_prompt", "the last user turn is empty")
    n = sum(len(m["content"]) for m in msgs)
    if n > cfg.max_chars:
        raise RowError("too_long", f"{n} characters > max_chars {cfg.max_chars}")
    return msgs


def _output_row(record: dict | RowError, cfg: PromptsConfig, loc: str, source: str) -> dict:
    try:
        if isinstance(record, RowError):
            raise record
        own = record.get("source") if cfg.source is None else None
        source = own.strip() if isinstance(own, str) and own.strip() else source
        msgs = normalize_record(record, cfg)
        row = {"prompt_id": prompt_id(msgs), "messages": msgs, "source": source,
               "_loc": loc, "_error": None, "_detail": None}
        if cfg.label_field:
            label = record.get(cfg.label_field)
            if label is None or not str(label).strip():
                raise RowError("missing_label", f"no {cfg.label_field!r} value in this row")
            row["_label"] = str(label).strip()
        return row
    except RowError as e:
        return {"prompt_id": "row:" + loc, "messages": [], "source": source,
                "_loc": loc, "_error": e.reason, "_detail": e.detail}


# ---------------------------------------------------------------- input units

@dataclass
class _Unit:
    """One input file or HF dataset (row range ``start:stop``), read in order."""
    name: str
    source: str
    fmt: str
    path: str = ""
    fs: Any = None
    hf: Any = None
    start: int = 0
    stop: int | None = None


def _fmt_of(name: str, forced: str, single: bool) -> str | None:
    """Format of a file: by extension; a forced format wins for a single file and
    filters a directory's files."""
    by_ext = _EXTS.get(os.path.splitext(name.removesuffix(".gz"))[1].lower())
    if single and forced not in ("auto", "hf"):
        return forced
    return by_ext if forced in ("auto", by_ext) else None


def _hf_unit(cfg: PromptsConfig, name: str, source: str, load) -> _Unit:
    import datasets
    try:
        ds = load()
    except Exception as e:  # noqa: BLE001 — any loader failure is a whole-input error
        raise DataError(f"prompts.path: cannot load HF dataset {name!r}: {e} — check the name/path; "
                        "offline, save it with save_to_disk and point prompts.path at that directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ConfigError("prompts.split", f"no split {cfg.split!r} in {name}", f"use one of {', '.join(ds)}")
        ds, name = ds[cfg.split], f"{name}/{cfg.split}"
    return _Unit(name, cfg.source or source, "hf", hf=ds, stop=len(ds))


def _stem(name: str) -> str:
    """``sub/red_team.jsonl.gz`` → ``sub/red_team``: a file's name as a row ``source``."""
    return os.path.splitext(name.removesuffix(".gz"))[0]


def _plan(cfg: PromptsConfig) -> list[_Unit]:
    """Resolve ``cfg.path`` into ordered units; whole-input problems raise here."""
    path = cfg.path
    if path.startswith("builtin:"):
        files = sorted(BUILTIN_DIR.glob("*.jsonl")) if path == "builtin:all" else [BUILTIN_DIR / f"{path[8:]}.jsonl"]
        return [_Unit(f.name, cfg.source or f.stem, "jsonl", str(f), pafs.LocalFileSystem()) for f in files]
    if path.startswith("hf:"):
        import datasets
        name, _, conf = path[3:].partition(":")
        load = functools.partial(datasets.load_dataset, name, conf or None, split=cfg.split)
        return [_hf_unit(cfg, f"{name}/{cfg.split}", name, load)]
    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    info, base = fs.get_file_info(root), os.path.basename(root.rstrip("/"))
    if info.type == pafs.FileType.NotFound:
        raise ConfigError("prompts.path", f"{path} does not exist", "check the path (relative paths start at the working directory)")
    if info.type == pafs.FileType.File:
        fmt = _fmt_of(base, cfg.format, single=True)
        if fmt is None:
            raise ConfigError("prompts.path", f"can't tell the format of {base}",
                              "use a .jsonl/.json/.csv/.parquet file (optionally .gz), or set prompts.format")
        return [_Unit(base, cfg.source or _stem(base), fmt, root, fs)]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    if cfg.format == "hf" or {"dataset_dict.json", "state.json"} & names:
        import datasets
        return [_hf_unit(cfg, base, base, functools.partial(datasets.load_from_disk, path))]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and not i.base_name.startswith(("_", ".")))
    rels = [(p, os.path.relpath(p, root)) for p in found]
    units = [_Unit(r, cfg.source or _stem(r), f, p, fs) for p, r in rels if (f := _fmt_of(p, cfg.format, single=False))]
    if not units:
        raise ConfigError("prompts.path", f"no {cfg.format if cfg.format != 'auto' else '.jsonl/.json/.csv/.parquet'} "
                          f"files in directory {path}", "point prompts.path at the data files or set prompts.format")
    return units


# ---------------------------------------------------------------- reading

def _json_record(item: Any) -> dict | RowError:
    try:
        rec = json.loads(item) if isinstance(item, bytes) else item
    except ValueError as e:
        return RowError("bad_json", f"invalid JSON: {e}")
    return rec if isinstance(rec, dict) else RowError("bad_json", f"not a JSON object: {str(rec)[:80]!r}")


def _records(u: _Unit, cfg: PromptsConfig) -> Iterator[dict | RowError]:
    """Records of one unit in file order; index = position in this iterator."""
    if u.fmt in ("jsonl", "csv"):
        with io.BufferedReader(u.fs.open_input_stream(u.path, compression="detect")) as f:
            if u.fmt == "csv":
                csv.field_size_limit(2**31 - 1)
                yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
            elif f.peek(64).lstrip()[:1] == b"[":      # a .json file holding one array of records
                yield from map(_json_record, json.load(f))
            else:                                       # JSON lines; blank lines are not records
                yield from (_json_record(line) for line in f if line.strip())
    elif u.fmt == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(u.fs.open_input_file(u.path))
        names = pf.schema_arrow.names
        cols = [c for c in (cfg.field, "source", cfg.label_field) if c and c in names] if cfg.field in names else None
        for batch in pf.iter_batches(batch_size=_BLOCK_ROWS, columns=cols):
            yield from batch.to_pylist()
    else:
        names = u.hf.column_names
        ds = u.hf.select_columns([c for c in (cfg.field, "source", cfg.label_field) if c and c in names]) \
            if cfg.field in names else u.hf
        for s in range(u.start, u.stop, _BLOCK_ROWS):
            yield from ds.with_format("arrow")[s:min(s + _BLOCK_ROWS, u.stop)].to_pylist()


def _iter_rows(units: list[_Unit], cfg: PromptsConfig, budget: int | None) -> Iterator[dict]:
    n = 0
    for u in units:
        i = u.start
        try:
            for i, rec in enumerate(_records(u, cfg), start=u.start):
                if budget is not None and n >= budget:
                    return
                if cfg.limit_per_file is not None and i - u.start >= cfg.limit_per_file:
                    break
                yield _output_row(rec, cfg, f"{u.name}:{i}", u.source)
                n += 1
        except (OSError, ValueError, csv.Error, pa.ArrowException) as e:
            raise DataError(f"prompts.path: cannot read {u.name} as {u.fmt} (near row {i}): {e}") from None


def _columns(u: _Unit, cfg: PromptsConfig) -> list[str]:
    """Column names seen in a unit's first records (for the whole-input field check)."""
    cols: dict[str, None] = {}
    for rec in itertools.islice(_records(u, cfg), 100):
        cols.update(dict.fromkeys(rec) if isinstance(rec, dict) else {})
    return list(cols)


def _check_field(units: list[_Unit], cfg: PromptsConfig) -> None:
    seen: dict[str, None] = {}
    for u in units:
        try:
            cols = _columns(u, cfg)
        except (OSError, ValueError, csv.Error, pa.ArrowException) as e:
            raise DataError(f"prompts.path: cannot read {u.name} as {u.fmt}: {e}") from None
        if cfg.field in cols:
            return
        seen.update(dict.fromkeys(map(str, cols)))
    if seen:
        where = units[0].name if len(units) == 1 else f"any of {len(units)} files ({units[0].name}, ...)"
        guess = next((c for c in _LIKELY_FIELDS if c in seen), next(iter(seen)))
        raise ConfigError("prompts.field", f"column {cfg.field!r} not in {where} (columns: {', '.join(seen)})",
                          f"set prompts.field: {guess}")


def iter_prompt_rows(cfg: PromptsConfig) -> Iterator[dict]:
    """Plain-python rows of ``RAW_SCHEMA`` shape, in input order (no Ray)."""
    units = _plan(cfg)
    _check_field(units, cfg)
    yield from _iter_rows(units, cfg, cfg.limit)


# ---------------------------------------------------------------- Ray

def _read_blocks(units: list[_Unit], cfg: PromptsConfig) -> Iterator[pa.Table]:
    rows = _iter_rows(units, cfg, cfg.limit)
    while chunk := list(itertools.islice(rows, _BLOCK_ROWS)):
        yield pa.Table.from_pylist(chunk, schema=RAW_SCHEMA)


def _datasource(units: list[_Unit], cfg: PromptsConfig):
    """A Ray Datasource: one read task per file (or HF row range); with ``limit``, one
    task over all units in order, so "the first N rows" is deterministic; with ``limit_per_file``,
    one task per file (an HF dataset is not split into row ranges)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PromptDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            groups = [units] if cfg.limit else [[u] for u in units] if cfg.limit_per_file else \
                [[p] for u in units for p in _split(u, parallelism)]
            return [ReadTask(functools.partial(_read_blocks, g, cfg),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                           input_files=[u.path for u in g if u.path]),
                             schema=RAW_SCHEMA, per_task_row_limit=per_task_row_limit) for g in groups]
    return PromptDatasource()


def _split(u: _Unit, parallelism: int) -> list[_Unit]:
    if u.fmt != "hf":
        return [u]
    step = max(_BLOCK_ROWS, -(-(u.stop - u.start) // max(parallelism, 1)))
    return [_Unit(u.name, u.source, "hf", hf=u.hf, start=s, stop=min(s + step, u.stop))
            for s in range(u.start, u.stop, step)] or [u]


def read_prompts(cfg: PromptsConfig):
    """The ``prompts`` dataset (columns of ``RAW_SCHEMA``, one row per input row).

    Why a custom datasource instead of ``read_json``/``read_csv``/``read_parquet`` +
    ``map_batches``: Ray's readers give at most the file path (``include_paths``), never
    a row's index inside its file, and may split or reorder a file's blocks, so ``_loc``
    could not be exact; ``read_json`` also fails a whole file on one malformed line
    (here: a ``bad_json`` row). ``from_huggingface`` copies the whole table through the
    driver. Each read task here streams one file (or one HF row range) in order and
    yields ~1k-row blocks, so indices are exact and memory stays bounded; files (and HF
    ranges) still read in parallel.
    """
    import ray

    units = _plan(cfg)
    _check_field(units, cfg)
    return ray.data.read_datasource(_datasource(units, cfg))
