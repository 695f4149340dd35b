"""The label cache's rows as columns (pure: numpy and pyarrow, no I/O; ``label_cache`` stores them).

A key (``pairwise.cache_key``, 64 hex digits of a sha256) is kept as its first 128 bits, two
``uint64`` columns ``k0`` and ``k1`` (a collision among 10^10 keys has odds ~10^-19); its
partition is the key's first byte (the top 8 bits of ``k0``). Rows are sorted by ``(k0, k1)``
with one row per key, so a lookup is a binary search. Values: ``p_a``, ``logp_a``, ``logp_b``
(float64) and ``reasoning`` (chain-of-thought text or null).
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

PARTITIONS = 256
F64 = pa.float64()
SCHEMA = pa.schema([("k0", pa.uint64()), ("k1", pa.uint64()), ("p_a", F64), ("logp_a", F64),
                    ("logp_b", F64), ("reasoning", pa.string())])
LEGACY_SCHEMA = pa.schema([("key", pa.string()), ("p_a", F64), ("logp_a", F64), ("logp_b", F64),
                           ("reasoning", pa.string())])  # the one-shard-per-flush layout before this one
FIELDS = ("p_a", "logp_a", "logp_b", "reasoning")
_NIBBLE = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[ord(chr(_c).upper())] = _i


def value(key: str, v: dict) -> dict:
    """A cache value checked and normalised; a failed judgment (non-finite ``p_a``) is refused."""
    if not isinstance(v, dict) or "p_a" not in v:
        raise ValueError(f"label cache value for {key!r} must be a dict with p_a, logp_a, logp_b[, reasoning]")
    if not math.isfinite(float(v["p_a"])):
        raise ValueError(f"label cache value for {key!r} has p_a={v['p_a']!r}: cache only successful judgments")
    return {"p_a": float(v["p_a"]), "logp_a": float(v.get("logp_a", math.nan)),
            "logp_b": float(v.get("logp_b", math.nan)), "reasoning": v.get("reasoning")}


def key_columns(keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-hex keys (a list or a pyarrow string array) → ``(k0, k1, ok)``: the first 128 bits as
    two uint64 arrays, vectorised over the hex bytes, and which keys are well formed (64 hex
    digits, not null; the others get k0 = k1 = 0)."""
    arr = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, bool)
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    ok = (np.diff(offsets) == 64) & ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    starts = np.where(ok, offsets[:-1], 0)
    if not ok.all():  # gather the well-formed ones (a fast path when all are: one contiguous slice)
        digits = np.zeros((n, 32), np.uint8)
        digits[ok] = data[starts[ok, None] + np.arange(32)]
    elif offsets[-1] - offsets[0] == 64 * n:
        digits = data[offsets[0]:offsets[-1]].reshape(n, 64)[:, :32]
    else:
        digits = data[starts[:, None] + np.arange(32)]
    nib = _NIBBLE[digits]
    ok &= (nib != 255).all(axis=1)
    nib[~ok] = 0
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2]).view(">u8").astype(np.uint64)
    return np.ascontiguousarray(packed[:, 0]), np.ascontiguousarray(packed[:, 1]), ok


def checked_key_columns(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    k0, k1, ok = key_columns(keys)
    if not ok.all():
        bad = keys[int(np.argmin(ok))]
        raise ValueError(f"label cache key {bad!r} is not a cache_key (64 hex digits)")
    return k0, k1


def partition_of(k0: np.ndarray) -> np.ndarray:
    return (k0 >> np.uint64(56)).astype(np.int64)


def rows(values: dict[str, dict]) -> pa.Table:
    """``{key: value}`` (checked values) → a ``SCHEMA`` table sorted by key."""
    keys = list(values)
    k0, k1 = checked_key_columns(keys)
    cols = {f: [values[k][f] for k in keys] for f in FIELDS}
    table = pa.table({"k0": k0, "k1": k1, **{f: pa.array(cols[f], SCHEMA.field(f).type) for f in FIELDS}},
                     schema=SCHEMA)
    return newest(table)


def from_legacy(table: pa.Table) -> pa.Table:
    """A legacy shard's rows (string ``key``) in ``SCHEMA``; malformed keys are dropped."""
    k0, k1, ok = key_columns(table["key"])
    out = pa.table({"k0": k0, "k1": k1, **{f: table[f] for f in FIELDS}}, schema=SCHEMA)
    return out.filter(pa.array(ok)) if not ok.all() else out


def newest(table: pa.Table) -> pa.Table:
    """Sorted by ``(k0, k1)``, one row per key: the one latest in ``table`` (later rows win)."""
    n = table.num_rows
    if n == 0:
        return table
    k0, k1 = table["k0"].to_numpy(), table["k1"].to_numpy()
    order = np.lexsort((np.arange(n), k1, k0))
    s0, s1 = k0[order], k1[order]
    last = np.ones(n, bool)
    last[:-1] = (s0[1:] != s0[:-1]) | (s1[1:] != s1[:-1])
    keep = order[last]
    return table if len(keep) == n and (keep == np.arange(n)).all() else table.take(pa.array(keep))


def find(k0: np.ndarray, k1: np.ndarray, q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """Row of each query key in sorted unique ``(k0, k1)``, -1 where absent."""
    lo, hi = np.searchsorted(k0, q0, "left"), np.searchsorted(k0, q0, "right")
    at = np.minimum(lo, max(len(k0) - 1, 0))
    out = np.where((hi - lo == 1) & (k1[at] == q1) if len(k0) else np.zeros(len(q0), bool), lo, -1)
    for i in np.flatnonzero(hi - lo > 1):  # two keys sharing their first 64 bits: never in practice
        j = lo[i] + np.searchsorted(k1[lo[i]:hi[i]], q1[i])
        out[i] = j if j < hi[i] and k1[j] == q1[i] else -1
    return out.astype(np.int64)


def found(table: pa.Table, k0: np.ndarray, k1: np.ndarray, q0: np.ndarray, q1: np.ndarray) -> dict[int, dict]:
    """``{query index: value}`` (every column but the key's) of the query keys in ``table``
    (sorted, one row per key; ``k0``, ``k1`` its key columns)."""
    rows = find(k0, k1, q0, q1)
    hit = np.flatnonzero(rows >= 0)
    values = table.drop_columns(["k0", "k1"]).take(pa.array(rows[hit], pa.int64())).to_pylist()
    return dict(zip(hit.tolist(), values))


def window(table: pa.Table, lo: int, hi: int) -> pa.Table:
    """The rows of partitions ``lo`` to ``hi - 1``."""
    parts = partition_of(table["k0"].to_numpy())
    return table.filter(pa.array((parts >= lo) & (parts < hi)))
