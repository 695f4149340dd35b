"""Seconds a stage spends reading its input through Ray Data: Ray's newer parquet reader (the
default since Ray 2.5x) against the classic one that ``cai`` uses, both in one local cluster,
same files, same pipeline (a read, a pass-through ``map_batches``, ``take_all``), alternating.

    python benchmarks/read_overhead.py [--files 3] [--rows 8] [--reps 4] [--cpus 2]

A stage's input is a run directory's few files, so the fixed cost of a read is what counts: the
newer reader starts a pool of footer-reading actors (a worker process each) for every read.
The first read of each kind is a warm-up (workers start) and left out. Last line: the ratio of
the medians (newer / classic); above 1 means the classic reader is the faster one here.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import processor  # noqa: E402


def read_seconds(path: str, v2: bool) -> float:
    import ray

    ray.data.DataContext.get_current().use_datasource_v2 = v2
    started = time.perf_counter()
    ray.data.read_parquet(path).map_batches(lambda b: b, batch_format="pyarrow").take_all()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3, help="parquet files in the input (a run dir's few)")
    ap.add_argument("--rows", type=int, default=8, help="rows per file")
    ap.add_argument("--reps", type=int, default=6, help="timed reads of each kind, after one warm-up each")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    work = tempfile.mkdtemp(prefix="read-overhead-")
    for i in range(args.files):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(args.rows)], "x": list(range(args.rows))}),
                       os.path.join(work, f"part-{i}.parquet"))
    print(f"processor: {processor()} ({os.cpu_count()} cores); local cluster of {args.cpus} CPUs; "
          f"input {args.files} files × {args.rows} rows")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per execution otherwise
    try:
        times: dict[bool, list[float]] = {True: [], False: []}
        for v2 in (True, False):
            read_seconds(work, v2)  # warm-up
        for _ in range(args.reps):
            for v2 in (True, False):
                times[v2].append(read_seconds(work, v2))
    finally:
        ray.shutdown()
    newer, classic = statistics.median(times[True]), statistics.median(times[False])
    for v2, name in ((True, "newer reader (use_datasource_v2=True) "), (False, "classic reader (what cai uses)")):
        print(f"{name}: median {statistics.median(times[v2]):.2f} s per read "
              f"({', '.join(f'{t:.2f}' for t in times[v2])})")
    print(f"read overhead: newer / classic = {newer / classic:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
