"""Labeling at scale: the ``preference`` stage's bookkeeping, resume and label cache as the pair
count grows, with an instant engine (``benchmarks.labeling:instant_engine``) so that nothing but
the dataflow is measured. Each size runs in a fresh process with its own local Ray cluster:

- driver peak RSS (this process alone) and peak total RSS of every Ray process it started,
  sampled every 0.25 s; pairs/s end to end (sampling and judging, finalize and report included);
- finalize + reconcile alone: the judging phase's finalize run again on its raw rows, on one core
  (Arrow's thread pools set to 1), as rows/s;
- at ``--resume-at`` pairs (default: the largest size): a run killed (SIGKILL, driver and its
  Ray processes, by pid) half a fresh run's time after its stage started, then run again: the
  resumed run's seconds against the fresh run's at that size (and the share of blocks saved);
- the label cache at the largest size's judgment count (``benchmarks.label_cache.measure``:
  memory per reader, lookups/s, hit rate on a re-run).

    python benchmarks/scale.py                                   # --pairs 100000,1000000
    python benchmarks/scale.py --pairs 1000000,10000000 --resume-at 0 --cache-entries 0  # by hand: 10M (~25 min)
    python benchmarks/scale.py --pairs 2000,20000 --cache-entries 20000   # a quick check

Goals: driver RSS ratio ≤ 1.2, rows/s ratio ≥ 0.8, resume ≤ 0.6 of a fresh run, label cache
≤ 256 MB per actor, finalize + reconcile ≥ 100k rows/s. The last line sums up, exactly:
``scale: pairs A -> B; driver peak RSS ... label cache N entries: M MB per actor``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Ray hands the driver's sys.path to its workers: they import this package too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CAI_ALLOW_RECIPE_CODE", "1")  # the instant engine is recipe code


def recipe(work: str, args):
    from workflows.core.spill import Budget
    from workflows.driver import Recipe

    engine = {"batch_size": args.batch, "concurrency": 2, "num_cpus": 1}
    return Recipe(name="scale", run_dir=os.path.join(work, "run"), bookkeeping=Budget(args.memory_mb), stages=[
        {"stage": "preference", "input": os.path.join(work, "prompts"), "samples_per_prompt": 2,
         "engine_factory": "benchmarks.labeling:instant_engine", "checkpoint_rows": args.checkpoint_rows,
         "policy": engine, "judges": [engine]}])


def finalize_alone(run_dir: str, memory_mb: int) -> dict:
    """The judging phase's finalize (both passes and the reconcile) again, on one core."""
    import pyarrow as pa

    from workflows.core import stage
    from workflows.core.spill import Budget
    from workflows.judging.workers import LABELS, route_labels

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    pref = os.path.join(run_dir, "preference")
    start = time.perf_counter()
    fin = stage.finalize(os.path.join(pref, "_judging"), "scale:judging", "pair_id", route_labels, [LABELS],
                         inputs=stage.ids_in(os.path.join(pref, "pairs"), "pair_id"), budget=Budget(memory_mb))
    secs = time.perf_counter() - start
    return {"finalize_rows": fin.rec.inputs, "finalize_s": secs, "finalize_rows_s": fin.rec.inputs / secs}


def child(n: int, work: str, args) -> None:
    """One run of the stage on ``n`` prompts (one pair each) in this fresh process: one JSON line."""
    import ray

    from benchmarks.labeling import PeakRSS, write_prompts
    from workflows.driver import run_recipe

    if not os.path.isdir(os.path.join(work, "prompts")):
        write_prompts(os.path.join(work, "prompts"), n)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _temp_dir=os.path.join(work, "ray"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss = PeakRSS()
    rss.start()
    start = time.perf_counter()
    info = run_recipe(recipe(work, args))["preference"]
    secs = time.perf_counter() - start
    out = {"n": n, "pairs": info["datasets"]["pairs"], "labels": info["outputs"], "seconds": secs,
           "rows_per_s": info["outputs"] / secs, "judgments": info["judgments"]}
    ray.shutdown()
    out.update(finalize_alone(os.path.join(work, "run"), args.memory_mb))
    rss.stop.set()
    rss.join()
    out.update({"driver_peak_mb": rss.driver / 2**20, "ray_peak_mb": rss.ray / 2**20})
    print(json.dumps(out), flush=True)


def _cmd(n: int, work: str, args) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", str(n), "--work", work,
            "--checkpoint-rows", str(args.checkpoint_rows), "--batch", str(args.batch),
            "--memory-mb", str(args.memory_mb)]


def _result(out: subprocess.CompletedProcess, what: str) -> dict:
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def size(n: int, args) -> dict:
    work = tempfile.mkdtemp(prefix="cai-scale-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        return _result(subprocess.run(_cmd(n, work, args), capture_output=True, text=True, cwd=ROOT), f"{n} pairs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _saved_share(run_dir: str) -> float:
    """Share of the stage's blocks (sampling and judging alike) with a raw file."""
    from workflows.core import blocks

    pref = os.path.join(run_dir, "preference")
    plan = os.path.join(pref, "_raw", blocks.PLAN)
    if not os.path.exists(plan):
        return 0.0
    per_phase = blocks.Plan(**json.load(open(plan))).blocks
    saved = sum(len([f for f in os.listdir(d) if blocks.block_of(f) is not None])
                for d in (os.path.join(pref, "_raw"), os.path.join(pref, "_judging", "_raw")) if os.path.isdir(d))
    return saved / (2 * per_phase)


def _end_tree(pid: int, temp_dir: str) -> None:
    """End the killed driver's Ray processes: those whose command line names its own temp dir."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != pid and temp_dir in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.Error:
                pass


def killed_and_resumed(n: int, fresh_s: float, args) -> dict:
    """Kill a run half way through — ``fresh_s``/2 after its stage started (a fresh run's seconds at
    this size; judging costs more per block than sampling, so half the blocks is not half the
    work) — then run it again: the second run's figures, and the share of blocks the first saved."""
    work = tempfile.mkdtemp(prefix="cai-scale-", dir="/tmp")
    try:
        proc = subprocess.Popen(_cmd(n, work, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                                start_new_session=True)
        run_dir = os.path.join(work, "run")
        plan = os.path.join(run_dir, "preference", "_raw", "_plan.json")
        started = None
        while started is None or time.time() < started + fresh_s / 2:
            if proc.poll() is not None:
                raise RuntimeError(f"the run to kill ended first:\n{proc.stderr.read().decode()[-3000:]}")
            if started is None and os.path.exists(plan):
                started = time.time()
            time.sleep(0.05)
        share = _saved_share(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _end_tree(proc.pid, os.path.join(work, "ray"))
        shutil.rmtree(os.path.join(work, "ray"), ignore_errors=True)
        again = _result(subprocess.run(_cmd(n, work, args), capture_output=True, text=True, cwd=ROOT), "resumed run")
        return {**again, "killed_at": share}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cache_figures(entries: int, args) -> dict:
    work = tempfile.mkdtemp(prefix="cai-cache-", dir="/tmp")
    try:
        from benchmarks.label_cache import measure

        return measure(entries, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    from workflows.core.spill import Budget

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="100000,1000000", help="sizes in pairs (= prompts), comma-separated")
    ap.add_argument("--resume-at", type=int,
                    help="size of the killed-and-resumed run (default: the largest, where start-up costs least; 0: skip)")
    ap.add_argument("--cache-entries", type=int,
                    help="label cache size (default: the largest size's judgments: 2 per pair; 0: skip)")
    ap.add_argument("--checkpoint-rows", type=int, default=8192, help="rows per block (the stage's checkpoint_rows)")
    ap.add_argument("--batch", type=int, default=1024, help="rows per engine batch")
    ap.add_argument("--memory-mb", type=int, default=Budget().memory_mb, help="the recipe's bookkeeping.memory_mb")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.work, args)
    from benchmarks.common import processor

    print(f"processor: {processor()} ({os.cpu_count()} cores); checkpoint_rows {args.checkpoint_rows}, "
          f"batch {args.batch}, bookkeeping.memory_mb {args.memory_mb}", flush=True)
    sizes = [int(s) for s in args.pairs.split(",") if s.strip()]
    runs = []
    for n in sizes:
        runs.append(size(n, args))
        print(json.dumps(runs[-1]), flush=True)
    resume_at = sizes[-1] if args.resume_at is None else args.resume_at
    resumed = None
    if resume_at:
        fresh = next((r for r in runs if r["n"] == resume_at), None) or size(resume_at, args)
        resumed = killed_and_resumed(resume_at, fresh["seconds"], args)
        resumed["ratio"] = resumed["seconds"] / fresh["seconds"]
        print(json.dumps({"resumed": resumed}), flush=True)
    entries = 2 * sizes[-1] if args.cache_entries is None else args.cache_entries
    cache = cache_figures(entries, args) if entries else {"entries": 0, "rss_growth_mb": float("nan")}
    print(json.dumps({"label_cache": cache}), flush=True)
    a, b = runs[0], runs[-1]
    print("finalize + reconcile on one core: " + ", ".join(f"{r['n']} pairs {r['finalize_rows_s']:,.0f} rows/s"
                                                            for r in runs) + " (goal >= 100,000)")
    r3 = f"{resumed['ratio']:.2f}" if resumed else "n/a"
    print(f"scale: pairs {a['n']} -> {b['n']}; driver peak RSS {a['driver_peak_mb']:.0f} MB -> "
          f"{b['driver_peak_mb']:.0f} MB (ratio {b['driver_peak_mb'] / a['driver_peak_mb']:.2f}); rows/s "
          f"{a['rows_per_s']:.0f} -> {b['rows_per_s']:.0f} (ratio {b['rows_per_s'] / a['rows_per_s']:.2f}); "
          f"resume after 50%: {r3}x of a fresh run; label cache {cache['entries']} entries: "
          f"{cache['rss_growth_mb']:.0f} MB per actor")


if __name__ == "__main__":
    main()
