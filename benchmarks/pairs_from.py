"""Reading an existing pairs file (``pairs_from``): the preference stage's ``read_pairs`` alone.

A JSON-lines file of ``--rows`` records (prompt, response_a, response_b; ``--dup`` of them copies
of an earlier record, spread over the file) is written once; ``read_pairs`` then runs on it in a
fresh process, measured: seconds, rows/s, and that process's peak RSS (psutil, sampled every
0.05 s; ``ru_maxrss`` as well) above what it held before the call (``baseline_mb``: imports).

    python benchmarks/pairs_from.py                          # 1,000,000 rows, 1 % duplicates
    python benchmarks/pairs_from.py --rows 100000 --tree ../other-checkout   # that checkout's code

``--tree`` measures another checkout of the project (e.g. the commit before a change) on the same
file. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pairs(path: str, rows: int, dup: float, seed: int = 0) -> int:
    """``rows`` records, ``dup`` of them repeating an earlier one; returns the duplicate count."""
    rng = random.Random(seed)
    n_dup = 0
    with open(path, "w") as f:
        for i in range(rows):
            if i and rng.random() < dup:
                k, n_dup = rng.randrange(i), n_dup + 1
            else:
                k = i
            f.write(json.dumps({"prompt": f"Question {k}: how should I answer a neighbour who asks for help?",
                                "response_a": f"Kindly, and with the help they ask for ({k}).",
                                "response_b": f"Not at all; they can sort it out themselves ({k})."}) + "\n")
    return n_dup


class PeakRSS(threading.Thread):
    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.every, self.peak, self.stop = psutil.Process(), every, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(self.every)


def measure(path: str, work: str, memory_mb: int) -> dict:
    """``read_pairs`` on ``path`` in this process (the project on ``sys.path``)."""
    import psutil

    from workflows.core.spill import Budget
    from workflows.core.stage import StageContext
    from workflows.core.typed import from_dict
    from workflows.judging.config import PreferenceConfig
    from workflows.preference.stage import read_pairs

    cfg = from_dict(PreferenceConfig, {"pairs_from": path}, "bench")
    ctx = StageContext(os.path.join(work, "run"), "preference", budget=Budget(memory_mb))
    base = psutil.Process().memory_info().rss
    rss = PeakRSS()
    rss.start()
    start = time.perf_counter()
    made = read_pairs(cfg, ctx)
    secs = time.perf_counter() - start
    rss.stop.set()
    rss.join()
    return {"rows": made.inputs, "pairs": made.pairs, "errors": made.errors, "errors_by_reason": made.errors_by_reason,
            "seconds": round(secs, 2), "rows_per_s": round(made.inputs / secs),
            "baseline_mb": round(base / 2**20, 1), "peak_rss_mb": round(max(rss.peak, base) / 2**20, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dup", type=float, default=0.01)
    ap.add_argument("--memory-mb", type=int, default=64, help="the bookkeeping budget")
    ap.add_argument("--tree", default=ROOT, help="the checkout whose code is measured")
    ap.add_argument("--file", help="an existing pairs file (else one is written)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.tree)
        print(json.dumps(measure(args.file, args.work, args.memory_mb)), flush=True)
        return 0
    work = tempfile.mkdtemp(prefix="cai-pairs-bench-")
    try:
        path = args.file or os.path.join(work, "pairs.jsonl")
        if not args.file:
            write_pairs(path, args.rows, args.dup)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--file", path, "--work", work,
               "--tree", os.path.abspath(args.tree), "--memory-mb", str(args.memory_mb)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                             env={**os.environ, "PYTHONPATH": os.path.abspath(args.tree)})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        result = {"tree": os.path.abspath(args.tree), "file_mb": round(os.path.getsize(path) / 2**20, 1),
                  **json.loads(lines[-1])}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
