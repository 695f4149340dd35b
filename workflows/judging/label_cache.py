"""A cache of judge outputs in the run's storage, shared by every judging actor, so re-runs,
resumed runs and other actors skip judgments already paid for.

Layout under the cache URI (local path or ``s3://...``; rows as ``label_keys`` describes them —
keys as two uint64, 256 partitions by the key's first byte — files through ``label_store``):

- ``delta/<time_ns>-<random>.parquet``: one per ``flush()`` (one block of one actor), sorted, written whole.
- ``runs/<time_ns>-<random>.ipc``: a sorted run made by compaction, every partition in row groups
  of its own of at most ``ROW_GROUP`` rows, as Arrow IPC messages (keys and numbers, then the
  reasoning text) and an index of each row group's first ``k0`` and offsets: the compacted cache.
  Runs of earlier versions (``runs/*.parquet``, ``k0`` statistics) are read through their footers
  until a compaction rewrites them.
- ``manifests/<gen>.json``: generation ``gen``: its runs (oldest first) and the deltas it folded.
- ``CURRENT``: ``{"gen": N}``, written whole after everything it names; none: nothing compacted.
- ``shard-*.parquet``: the legacy layout (a shard per flush, string keys) of run directories made
  by earlier versions: read as the oldest deltas, so they keep their hits; compaction folds them in.

Reading (``get_many``, one call per block): ``CURRENT`` (and its manifest when it changed); in
each run, the row groups whose ``k0`` range can hold a wanted key (run indexes kept per actor and
run; on S3 exact-range reads, several at once; only the keys-and-numbers message unless
``reasoning`` is wanted); then every delta not folded yet — listed on every
call, so what other actors flushed in earlier blocks is seen. Later values win: newer delta, older
delta, newer run, older run. ``fields`` picks the value columns read (a judging actor reads only
``p_a``; the chain-of-thought text stays on disk). A file gone meanwhile (two compactions in
between) makes the call start over once.

Writing: ``put_many`` buffers, ``flush()`` writes one delta; a value with a non-finite ``p_a`` is
refused (a failure may be transient). Writers only add files: any number run at once, no locks.

Compaction (``compact()``; ``compacting()`` runs it at stage start, every ``every_s`` seconds in a
thread during the stage, and in full at its end): the deltas and legacy shards present now become
one new run, and the newest two runs are merged while the older is at most ``TIER`` times the
newer or more than ``MAX_RUNS`` are left, so a tick costs about what was written since, not the
whole cache (``full=True``: everything into one run). The manifest, then ``CURRENT`` are written;
then the deltas the previous generation skipped, and the runs and manifests neither this nor the
previous generation names, are deleted: a reader that read ``CURRENT`` a moment earlier still
finds its files (``GRACE_S`` later, a compaction with nothing to fold drops the rest). A delta
written meanwhile is not in the manifest: it stays a delta until the next compaction. Safe while
readers and writers run; only one compactor at a time (the stage's driver).

Memory per reader: the indexes of the current runs (24 bytes per row group of ``ROW_GROUP``
rows, ~0.024 bytes an entry: ~0.24 MB at 10M entries, ~5 MB at 200M, ~47 MB at 2B — a parquet
footer took ~3 KB per row group: ~600 MB at 200M), the unfolded deltas' ``fields`` (~24 bytes an
entry for ``p_a``; bounded by compaction ticks) and ``READ_GROUPS`` row groups at a time while it
reads a block's. ``benchmarks/label_cache.py`` (2-core Xeon): over 100k lookups a fresh
reader's RSS grows 16 MB at 1M entries (~38k lookups/s), 16 MB at 10M (~29k/s; parquet runs: 28 MB,
~42k/s and 87 MB, ~34k/s); 124 MB at 1M when it reads every field and each entry has 200
characters of chain-of-thought text (~5k/s, measured beside other work).
A compaction holds at most ``FOLD_BYTES`` of input files at once (more: several passes, each over
a range of partitions, reading only the runs' row groups in that range): ~4-5x that in memory.
A legacy shard is read whole by a reader: ``compacting()`` folds them in before actors start.

A file that cannot be read (cut short, corrupted) is renamed ``*.unreadable`` and its judgments
are made again; the stage summary counts it (``stage.unreadable_files`` looks in subfolders).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

import numpy as np
import pyarrow as pa

from workflows.judging import label_keys as lk
from workflows.judging.label_store import (
    CURRENT,
    DELTA,
    LEGACY,
    MANIFESTS,
    PARQUET_RUN,
    ROW_GROUP,
    RUN_EXT,
    RUNS,
    UNREADABLE,
    RunIndex,
    Store,
)

__all__ = ["LabelCache", "compacting", "ROW_GROUP", "READ_GROUPS", "FOLD_BYTES", "TIER", "MAX_RUNS", "GRACE_S"]
log = logging.getLogger(__name__)
FOLD_BYTES = 32 << 20  # input a compaction holds at once (in files; ~4x that in memory)
READ_GROUPS = 64  # row groups a lookup holds at once
GRACE_S = 60.0  # how long a generation's predecessor is kept for readers (a lookup takes far less)
TIER, MAX_RUNS = 1, 8  # merge the newest run into the one before while that is ≤ TIER × as big, or > MAX_RUNS


class _Gone(Exception):
    """A file listed a moment ago is gone: compactions ran in between."""


class LabelCache:
    """cache_key → ``{"p_a", "logp_a", "logp_b", "reasoning"}`` (or the ``fields`` asked for) under ``uri``."""

    def __init__(self, uri: str, fields: tuple[str, ...] = lk.FIELDS):
        self.uri, self.store, self.fields = uri, Store(uri), list(fields)
        self._pending: dict[str, dict] = {}
        self._gen, self._skip, self._runs, self._legacy = -1, frozenset(), [], []
        self._indexes: dict[str, RunIndex] = {}  # run → its index (24 bytes per row group)
        self._deltas: dict[str, tuple] = {}   # delta → (table, k0, k1), oldest first

    # ------------------------------------------------------------ reading
    def get_many(self, keys) -> dict[str, dict]:
        """The cached values of ``keys`` (pending writes included); absent keys are left out."""
        keys = list(dict.fromkeys(keys))
        out = {k: self._pending[k] for k in keys if k in self._pending}
        ask = [k for k in keys if k not in out]
        if ask:
            q0, q1 = lk.checked_key_columns(ask)
            try:
                found = self._lookup(q0, q1, gone_ok=False)
            except _Gone:
                self._gen = -1  # read CURRENT and its manifest again
                found = self._lookup(q0, q1, gone_ok=True)
            out.update((ask[i], v) for i, v in found.items())
        return out

    def get(self, key: str) -> dict | None:
        return self.get_many([key]).get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def entries(self) -> int:
        """Distinct keys stored (pending included), counted a range of partitions at a time."""
        self._refresh(gone_ok=True)
        extra = pa.table(dict(zip(("k0", "k1"), lk.checked_key_columns(list(self._pending)))))
        sizes = {n: self.store.size(n) for n in [*self._runs, *self._deltas]}
        return sum(lk.newest(pa.concat_tables([t.select(["k0", "k1"]) for t in tables]
                                              + [lk.window(extra, lo, hi)])).num_rows
                   for lo, hi, tables in self._windows(list(sizes), sizes, []))

    __len__ = entries

    def files(self) -> list[str]:
        """URIs of the files a reader reads now: runs, then deltas (legacy shards first)."""
        self._refresh(gone_ok=True)
        return [self.store.uri_of(n) for n in [*self._runs, *self._deltas]]

    def _lookup(self, q0, q1, gone_ok: bool) -> dict[int, dict]:
        self._refresh(gone_ok)
        found: dict[int, dict] = {}
        for run in list(self._runs):  # oldest first: later ones win
            found.update(self._run_found(run, q0, q1, gone_ok))
        for delta in self._deltas.values():
            found.update(lk.found(*delta, q0, q1))
        return found

    def _run_found(self, run: str, q0, q1, gone_ok: bool) -> dict[int, dict]:
        """The query keys found in ``run``: only the row groups whose k0 range holds one are read,
        ``READ_GROUPS`` at a time (chain-of-thought text makes a row group large)."""
        try:
            if run not in self._indexes:
                self._indexes[run] = self.store.index(run)
            index = self._indexes[run]
            groups, found = index.groups(q0), {}
            for at in range(0, len(groups), READ_GROUPS):
                t = self.store.read_groups(run, index, groups[at:at + READ_GROUPS], ["k0", "k1", *self.fields])
                found.update(lk.found(t, t["k0"].to_numpy(), t["k1"].to_numpy(), q0, q1))
            return found
        except FileNotFoundError:
            if not gone_ok:  # deleted by compactions: start over; else set aside by another reader
                raise _Gone(run) from None
        except UNREADABLE:
            self.store.set_aside(run)
        self._runs.remove(run)
        return {}

    def _refresh(self, gone_ok: bool) -> None:
        """Catch up with ``CURRENT`` and ``delta/``: read the new deltas, drop the folded ones."""
        gen = self.store.gen()
        if gen != self._gen:
            try:
                man = self.store.manifest(gen)
            except FileNotFoundError:
                if not gone_ok:
                    raise _Gone(gen) from None
                man = self.store.manifest(0)
            self._gen, self._skip, self._runs = gen, frozenset(man["deltas"]), [r["name"] for r in man["runs"]]
            self._indexes = {r: f for r, f in self._indexes.items() if r in self._runs}
            self._legacy = [n for n, _ in self.store.listing(LEGACY)]  # nothing writes them any more
        live = [n for n in self._legacy + [n for n, _ in self.store.listing(DELTA)] if n not in self._skip]
        for name in live:
            if name not in self._deltas:
                try:
                    table = self.store.read(name, self.fields)
                except FileNotFoundError:
                    if not gone_ok:
                        raise _Gone(name) from None
                    continue
                if table is not None:  # else unreadable: set aside
                    table = lk.newest(table)
                    self._deltas[name] = (table, table["k0"].to_numpy(), table["k1"].to_numpy())
        self._deltas = {n: self._deltas[n] for n in live if n in self._deltas}  # oldest first

    # ------------------------------------------------------------ writing
    def put_many(self, values: dict[str, dict]) -> None:
        """Buffer new entries; nothing is written until ``flush()``."""
        checked = {k: lk.value(k, v) for k, v in values.items()}
        lk.checked_key_columns(list(checked))
        self._pending.update(checked)

    def flush(self) -> str | None:
        """Write pending entries as one new delta; returns its URI (None if nothing pending)."""
        if not self._pending:
            return None
        name = f"{DELTA}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        self.store.write(lk.rows(self._pending), name)
        self._pending = {}
        return self.store.uri_of(name)

    # ------------------------------------------------------------ compaction
    def compact(self, full: bool = True) -> int | None:
        """Fold the deltas and legacy shards present now into a new generation and return its number
        (None: nothing to do). ``full``: into one run; else tiered (cheap: for ticks during a stage).
        Safe while readers and writers run; one compactor at a time."""
        store, gen = self.store, self.store.gen()
        old = store.manifest(gen)
        skip = set(old["deltas"])
        listed = dict(n for n in store.listing(LEGACY) + store.listing(DELTA) if n[0] not in skip)
        runs, folded = list(old["runs"]), []
        if listed or (full and len(runs) > 1):
            if full:
                merged, folded = self._merge(runs, listed)
                runs = [merged] if merged else []
            else:
                merged, folded = self._merge([], listed)
                runs += [merged] if merged else []
                while len(runs) > 1 and (runs[-2]["rows"] <= TIER * runs[-1]["rows"] or len(runs) > MAX_RUNS):
                    merged, _ = self._merge(runs[-2:], {})
                    runs[-2:] = [merged] if merged else []
            gen += 1
            store.write_json({"gen": gen, "runs": runs, "folded": folded, "deltas": folded + old["folded"],
                              "written": time.time()}, f"{MANIFESTS}{gen:06d}.json")
            store.write_json({"gen": gen}, CURRENT)
        self._clean(gen, old, runs)
        return gen if gen != old["gen"] else None

    def _clean(self, gen: int, old: dict, runs: list[dict]) -> None:
        """Delete what no reader of generation ``gen`` or of its predecessor reads (``old``: the
        generation before this compaction): runs, manifests, and deltas readers skip. A predecessor
        older than ``GRACE_S`` has no readers left: then only ``gen``'s own files stay."""
        store, grown = self.store, gen != old["gen"]
        settled = not grown and time.time() - old.get("written", 0) > GRACE_S
        before = old if grown or settled else store.manifest(0)
        if not grown and not settled and gen > 1:
            with contextlib.suppress(FileNotFoundError):
                before = store.manifest(gen - 1)
        skipped = set(old["deltas"]) if grown or settled else set(old["deltas"]) - set(old["folded"])
        for name in skipped:  # skipped by readers of gen and of its predecessor
            store.delete(name)
        keep = {r["name"] for r in runs + ([] if settled else before["runs"])}
        for name, _ in store.listing(RUNS, (RUN_EXT, PARQUET_RUN)):
            if name not in keep:  # merged before, or left by a compaction that died
                store.delete(name)
        for name, _ in store.listing(MANIFESTS, ".json"):
            if int(name[len(MANIFESTS):-5]) < gen - (0 if settled else 1):
                store.delete(name)

    def _merge(self, runs: list[dict], files: dict[str, int]) -> tuple[dict | None, list[str]]:
        """One new run: ``runs`` (oldest first) updated by the delta and legacy ``files`` (oldest
        first; their sizes), the newest value per key. Returns its manifest entry (None: no rows)
        and the files it folded (an unreadable one is set aside instead)."""
        name, rows, ok = f"{RUNS}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{RUN_EXT}", 0, []
        sizes = {**{r["name"]: r["bytes"] for r in runs}, **files}
        with self.store.run_writer(name) as write:
            for _, _, tables in self._windows(list(sizes), sizes, ok):
                table = lk.newest(pa.concat_tables(tables))
                tables.clear()  # the inputs go before the output is written
                write(table)
                rows += table.num_rows
        if not rows:
            self.store.delete(name)
            return None, [n for n in files if n in ok]
        return {"name": name, "rows": rows, "bytes": self.store.size(name)}, [n for n in files if n in ok]

    def _windows(self, sources: list[str], sizes: dict[str, int], ok: list[str]):
        """Yields (lo, hi, tables): the rows of partitions lo..hi-1 of every source (runs and
        deltas, oldest first), a range of partitions small enough to hold at once. Appends the
        sources read whole to ``ok``; one that cannot be read is set aside and left out."""
        known = sum(v for v in sizes.values() if v is not None)  # a run whose size was not read: planned as 0
        passes = min(lk.PARTITIONS, max(1, -(-known // FOLD_BYTES)))
        bounds = np.linspace(0, lk.PARTITIONS, passes + 1).astype(int).tolist()
        bad: set[str] = set()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tables = [pa.table({c: pa.array([], lk.SCHEMA.field(c).type) for c in lk.SCHEMA.names})]
            for src in sources:
                if src in bad:
                    continue
                try:
                    if src.startswith(RUNS):
                        index = self.store.index(src)
                        groups = index.in_partitions(lo, hi)
                        if len(groups):
                            t = self.store.read_groups(src, index, groups.tolist(), lk.SCHEMA.names)
                            tables.append(lk.window(t, lo, hi))
                    else:
                        tables += [lk.window(t, lo, hi) for t in self.store.batches(src)]
                except FileNotFoundError:  # set aside by a reader
                    bad.add(src)
                except UNREADABLE:
                    self.store.set_aside(src)
                    bad.add(src)
            yield lo, hi, tables
        ok += [s for s in sources if s not in bad]


@contextlib.contextmanager
def compacting(uri: str, every_s: float = 30.0):
    """Compact the cache at ``uri`` now, every ``every_s`` seconds in a background thread while the
    body runs (tiered; a failure is one warning line and the next tick tries again) and in full
    when it ends (a failure then raises; when the body raised, not at all: the next stage start
    folds what it left). The caller must be the cache's only compactor."""
    cache = LabelCache(uri)
    cache.compact(full=False)  # a crashed run's deltas, a legacy directory: folded before actors read them
    stop = threading.Event()

    def tick():
        while not stop.wait(every_s):
            try:
                cache.compact(full=False)
            except Exception as e:  # noqa: BLE001 - never stops the stage
                log.warning("label cache %s: compaction failed (%s: %s); trying again in %g s",
                            uri, type(e).__name__, e, every_s)

    thread = threading.Thread(target=tick, name="label-cache-compaction", daemon=True)
    thread.start()
    try:
        yield cache
    finally:
        stop.set()
        thread.join()  # one compactor at a time, even when the body failed
    cache.compact()
