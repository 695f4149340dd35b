"""Memory and speed of one judging actor's reads of the shared label cache at scale.

    python benchmarks/label_cache.py [--entries 1000000] [--lookups 100000] [--batch 512]
                                     [--tick 100] [--reasoning 0] [--fields p_a]

Fills a cache with ``entries`` random entries the way actors write them (``put_many`` then
``flush()``: one delta of ``2 × batch`` entries per block) with a tiered compaction every ``tick``
deltas, as ``compacting()`` runs them during a stage, and a full one at the end, as when a stage
ends. Then, in a fresh process (so its memory is the reader's own; Arrow used once before the
baseline, as in any Ray Data actor), one ``LabelCache`` reading ``fields`` (a judging actor's
``ActorCache`` reads ``p_a``) does ``lookups`` lookups in ``get_many`` calls of ``batch`` keys, half
present and half absent, then looks the present ones up again (a re-run: each should hit).
Reported: the reader's memory growth (peak RSS, sampled every 5 ms, and USS — private memory —
at the end), lookups/s and the re-run's hit rate. Last line: ``label cache: N entries, M MB per
actor (RSS growth), L lookups/s, hit rate H``. ``--reasoning C`` gives every entry C characters of
chain-of-thought text (one repeated letter: it compresses to nothing on disk, not in memory).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import processor  # noqa: E402


def key(i: int) -> str:
    """Entry ``i``'s key: a sha256 hex like ``pairwise.cache_key``; i ≥ entries are absent keys."""
    return hashlib.sha256(b"label-cache-bench-%d" % i).hexdigest()


def fill(uri: str, entries: int, block: int, reasoning: int, tick: int) -> dict:
    """Write ``entries`` entries as actors do, one delta per ``block`` entries, with a tiered
    compaction every ``tick`` deltas as ``compacting()`` runs them during a stage (0: none)."""
    from workflows.judging.label_cache import LabelCache

    text = ("x" * reasoning) or None
    cache, compactor, tick_s, runs = LabelCache(uri), LabelCache(uri), 0.0, 0
    started = time.perf_counter()
    for n, lo in enumerate(range(0, entries, block), 1):
        p = [((i * 2654435761) % 997 + 1) / 999 for i in range(lo, min(lo + block, entries))]
        cache.put_many({key(lo + j): {"p_a": v, "logp_a": math.log(v), "logp_b": math.log1p(-v), "reasoning": text}
                        for j, v in enumerate(p)})
        cache.flush()
        if tick and n % tick == 0:
            t = time.perf_counter()
            compactor.compact(full=False)
            tick_s += time.perf_counter() - t
            runs = max(runs, len(compactor.store.manifest(compactor.store.gen())["runs"]))
    return {"fill_s": round(time.perf_counter() - started, 1), "ticks_s": round(tick_s, 1), "most_runs": runs}


def reader(uri: str, entries: int, lookups: int, batch: int, fields: tuple[str, ...], seed: int = 0) -> dict:
    """One fresh reader's figures (run in its own process by ``measure``)."""
    import gc
    import random

    import psutil

    from workflows.judging.label_cache import LabelCache  # imported before the baseline: not the reader's memory

    rng = random.Random(seed)
    present = [key(i) for i in rng.sample(range(entries), min(entries, lookups // 2))]
    absent = [key(entries + i) for i in range(lookups - len(present))]
    asks = present + absent
    rng.shuffle(asks)
    _warm_arrow()
    gc.collect()
    proc = psutil.Process()
    base_rss, base_uss = proc.memory_info().rss, proc.memory_full_info().uss
    peak, done = [base_rss], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    cache = LabelCache(uri, fields)
    started, found = time.perf_counter(), 0
    for lo in range(0, len(asks), batch):
        found += len(cache.get_many(asks[lo:lo + batch]))
    first_s = time.perf_counter() - started
    started, again = time.perf_counter(), 0
    for lo in range(0, len(present), batch):
        again += len(cache.get_many(present[lo:lo + batch]))
    rerun_s = time.perf_counter() - started
    done.set()
    peak[0] = max(peak[0], proc.memory_info().rss)
    indexes = list(cache._indexes.values())
    return {"index_bytes": sum(i.nbytes() for i in indexes), "row_groups": sum(len(i.lo) for i in indexes),
            "rss_growth_mb": round((peak[0] - base_rss) / 2**20, 1),
            "uss_growth_mb": round((proc.memory_full_info().uss - base_uss) / 2**20, 1),
            "lookups_per_s": round(len(asks) / first_s), "found_share": round(found / len(asks), 4),
            "rerun_lookups_per_s": round(len(present) / rerun_s), "hit_rate": round(again / len(present), 4)}


def _warm_arrow() -> None:
    """What any Ray Data actor has done long before: Arrow's allocator and parquet reader used once
    (~30 MB the first time in any process), so the growth measured is the cache's own."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": pa.array(["warm"])}), buf)
    pq.read_table(io.BytesIO(buf.getvalue())).filter(pa.array([True])).to_pylist()


def measure(entries: int, workdir: str, lookups: int = 100_000, batch: int = 512, reasoning: int = 0,
            fields: tuple[str, ...] = ("p_a",), tick: int = 100) -> dict:
    """Fill (as deltas of ``2 × batch`` entries, a tiered compaction every ``tick`` deltas), compact
    in full as a stage ends, and measure a fresh reader in a subprocess reading ``fields`` (a
    judging actor's ``ActorCache`` reads ``p_a`` only)."""
    from workflows.judging.label_cache import LabelCache

    uri = os.path.join(workdir, "label_cache")
    filled = fill(uri, entries, 2 * batch, reasoning, tick)
    started = time.perf_counter()
    LabelCache(uri).compact()
    compact_s = time.perf_counter() - started
    cache = LabelCache(uri)
    size = sum(r["bytes"] for r in cache.store.manifest(cache.store.gen())["runs"])
    out = subprocess.run([sys.executable, __file__, "--reader", uri, "--entries", str(entries),
                          "--lookups", str(lookups), "--batch", str(batch), "--fields", ",".join(fields)],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])})
    figures = {"entries": entries, "processor": processor(), "fields": list(fields), **filled,
               "compact_s": round(compact_s, 1), "base_mb": round(size / 2**20, 1), "reasoning_chars": reasoning,
               **json.loads(out.stdout.strip().splitlines()[-1])}
    print(f"processor: {figures['processor']} ({os.cpu_count()} cores); reader reads {','.join(fields)}; filled as {-(-entries // (2 * batch))} "
          f"deltas in {figures['fill_s']} s ({figures['ticks_s']} s of it in compactions every {tick} deltas, "
          f"at most {figures['most_runs']} runs), compacted at the end in {figures['compact_s']} s into {figures['base_mb']} MB; "
          f"reader USS growth {figures['uss_growth_mb']} MB; run indexes {figures['index_bytes']} bytes for "
          f"{figures['row_groups']} row groups ({figures['index_bytes'] / max(1, figures['row_groups']):.1f} bytes each); re-run {figures['rerun_lookups_per_s']} lookups/s")
    print(f"label cache: {entries} entries, {figures['rss_growth_mb']} MB per actor (RSS growth), "
          f"{figures['lookups_per_s']} lookups/s, hit rate {figures['hit_rate']}")
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=512, help="keys per get_many (a block's)")
    ap.add_argument("--reasoning", type=int, default=0, help="characters of chain-of-thought text per entry")
    ap.add_argument("--tick", type=int, default=100, help="deltas between compactions while filling (0: none)")
    ap.add_argument("--fields", default="p_a", help="value columns the reader reads (a judging actor: p_a)")
    ap.add_argument("--workdir", default=None, help="where the cache is built (default: a temporary folder)")
    ap.add_argument("--reader", default=None, help=argparse.SUPPRESS)  # the measured subprocess
    args = ap.parse_args(argv)
    if args.reader:
        print(json.dumps(reader(args.reader, args.entries, args.lookups, args.batch, tuple(args.fields.split(",")))))
        return 0
    with tempfile.TemporaryDirectory(prefix="label-cache-", dir=args.workdir) as work:
        measure(args.entries, work, args.lookups, args.batch, args.reasoning, tuple(args.fields.split(",")),
                args.tick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
