"""RL-CAI labeling throughput and memory, measured in one run:

(a) judged pairs/s of the ``preference`` stage (Ray Data actor pool, batched ``choice_logprobs``,
    both orders) versus a naive loop (one conversation at a time: ``model.generate`` of the
    answer letter with ``max_new_tokens=1``, each order separately), same pairs, same
    principles, the embedded SmolLM2-135M-Instruct. End to end: the stage's judging phase
    (actor start-up and model loads included) against the naive loop (model load excluded).
    Steady state: the stage's engine (same batch size) against the naive loop in this process,
    every core each, alternated ``--rounds`` times, best of each. Goal ≥ 5×.
(b) achieved FLOP/s of those batched judge forward passes as a fraction of the matmul peak in
    the engine's dtype measured in this process (best of five 2048² ``torch.matmul``; the first
    line printed gives the processor, the dtype ``auto`` chose there, and both peaks). FLOPs
    executed: 2 × non-embedding parameters × tokens the model ran (pads included; prompt
    tokens that prefix sharing skipped are not counted) + the LM head once per row; attention
    scores are left out. ``gflops_effective`` counts every prompt token instead: the work a
    naive implementation would do in that time. Goal ≥ 40 %.
(c) the dataflow alone: synthetic prompts through both phases with an instant fake engine
    (``engine_factory: benchmarks.labeling:instant_engine``), at --dataflow sizes, each in a
    fresh process: rows/s and peak RSS of the driver plus every Ray process (psutil, sampled).
    Goal: RSS at the largest size within 1.5× of the smallest.

    python benchmarks/labeling.py [--prompts 12 --samples 3] [--dataflow 100000,1000000] [--skip-model]
    python benchmarks/labeling.py --prompts 4 --samples 2 --dataflow 2000,10000     # a quick check
    python benchmarks/labeling.py --backends transformers,vllm --dataflow ""        # both engines

``--backends``: (a)'s stage runs once per engine backend (the policy sampling and the judges),
same prompts and seed; each one's judged pairs/s (judging phase, start-up included) and its judge
actors' load seconds are printed, and vLLM's rate against transformers'. (a)'s naive ratio and
(b) use the first backend.

The last line sums up every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Ray hands the driver's sys.path to its workers: they import this module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CAI_ALLOW_RECIPE_CODE", "1")  # this benchmark swaps in its own instant engines


# ---------------------------------------------------------------- (c) an instant engine

class InstantEngine:
    """Answers instantly: distinct texts for repeated conversations, P(A) from a checksum."""

    def __init__(self, cfg=None):
        self.name = "instant"

    def generate(self, conversations, params):
        from actors.base import Generation

        seen: dict[str, int] = {}
        out = []
        for c in conversations:
            key = c[-1]["content"]
            seen[key] = seen.get(key, -1) + 1
            out.append(Generation(text=f"Answer {seen[key]}: {key[:24]}", prompt_tokens=8, completion_tokens=4))
        return out

    def choice_logprobs(self, conversations, choices):
        ps = [0.1 + 0.8 * (zlib.crc32(c[-1]["content"].encode()) % 1000) / 1000 for c in conversations]
        return [[math.log(p), math.log(1 - p)] for p in ps]


def instant_engine(cfg) -> InstantEngine:
    return InstantEngine(cfg)


# ---------------------------------------------------------------- (a) stage vs naive loop

def stage_run(run_dir: str, args, backend: str = "transformers") -> dict:
    from workflows.driver import Recipe, run_recipe

    judge = {"backend": backend, "model": "embedded", "batch_size": args.batch_size, "concurrency": args.concurrency,
             "num_cpus": 1, "dtype": args.dtype}
    cfg = Recipe(name="bench", run_dir=run_dir, stages=[
        {"stage": "prompts", "path": "builtin:red_team", "limit": args.prompts},
        {"stage": "preference", "samples_per_prompt": args.samples, "principles_per_pair": args.principles,
         "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "seed": 0,
                      "repetition_penalty": 1.2},
         "policy": {"backend": backend, "model": "embedded", "batch_size": 16, "concurrency": args.concurrency,
                    "num_cpus": 1, "dtype": args.dtype},
         "judges": [judge]},
    ])
    return run_recipe(cfg)["preference"]


def judge_work(stage_dir: str, principles: int, seed: int = 0):
    """(pair rows, [(pair, conversation)] in both orders) exactly as the stage judged them."""
    import pyarrow.parquet as pq

    from workflows.core.constitution import load_constitution, sample_principles
    from workflows.core.pairwise import both_orders

    const = load_constitution("default")
    pairs = pq.read_table(os.path.join(stage_dir, "pairs")).to_pylist()
    convs = [c for p in pairs for pid in sample_principles(const, p["pair_id"], principles, seed)
             for c in both_orders(p["messages"], p["response_a"], p["response_b"], const.get(pid))]
    return pairs, convs


def naive(tok, model, convs: list) -> float:
    """Seconds to judge every conversation one at a time with ``model.generate(max_new_tokens=1)``."""
    import torch

    start = time.perf_counter()
    for conv in convs:
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        tok.decode(out[0, ids["input_ids"].shape[1]:])  # the letter
    return time.perf_counter() - start


# ---------------------------------------------------------------- (b) FLOP/s vs peak

def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def in_process(convs: list, batch_size: int, rounds: int, dtype: str, naive_dtype: str = "float32") -> dict:
    """The naive loop, the stage's own engine (same batch size, same dtype) on the same
    conversations, and the matmul peak in the engine's dtype, in this process with every core,
    alternated ``rounds`` times: best of each, so that load from other processes on a shared
    machine biases none of them."""
    import torch

    from actors import EngineConfig
    from actors.hf_engine import TransformersEngine
    from actors.models import load_causal_lm, load_tokenizer
    from benchmarks.common import matmul_peak

    threads = os.cpu_count() or 1
    eng = TransformersEngine(EngineConfig(model="embedded", batch_size=batch_size, torch_threads=threads,
                                          dtype=dtype))
    tok, model = load_tokenizer("embedded"), load_causal_lm("embedded", dtype=naive_dtype)
    torch.set_num_threads(threads)
    eng.choice_logprobs(convs[:2], ["A", "B"])  # warm-up both
    naive(tok, model, convs[:1])
    naive_s, engine_s, peaks, ran = [], [], [], 0
    for _ in range(rounds):
        naive_s.append(naive(tok, model, convs))
        before = eng.stats["prefill_tokens"]
        engine_s.append(_timed(lambda: eng.choice_logprobs(convs, ["A", "B"])))
        ran = eng.stats["prefill_tokens"] - before  # tokens the model ran, pads included
        peaks.append(matmul_peak(eng.model.dtype))
    body = sum(p.numel() for p in eng.model.parameters()) - eng.model.get_input_embeddings().weight.numel()
    head = eng.model.get_output_embeddings().weight.numel()  # run once per row (the last position)
    tokens = sum(eng.count_tokens(c) for c in convs)
    secs = min(engine_s)
    return {"naive_s": min(naive_s), "engine_s": secs, "tokens": tokens, "tokens_run": ran,
            "flops": (2 * body * ran + 2 * head * len(convs)) / secs,
            "flops_effective": (2 * body * tokens + 2 * head * len(convs)) / secs,
            "peak": max(peaks), "threads": threads}


# ---------------------------------------------------------------- (c) dataflow at scale

def write_prompts(out_dir: str, n: int, per_file: int = 100_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.core.stage import MESSAGES

    os.makedirs(out_dir, exist_ok=True)
    schema = pa.schema([("prompt_id", pa.string()), ("messages", MESSAGES), ("source", pa.string())])
    for start in range(0, n, per_file):
        ids = range(start, min(n, start + per_file))
        pq.write_table(pa.table({"prompt_id": [f"p{i:08d}" for i in ids],
                                 "messages": [[{"role": "user", "content": f"Synthetic question number {i}?"}]
                                              for i in ids],
                                 "source": ["synthetic"] * len(ids)}, schema=schema),
                       os.path.join(out_dir, f"part-{start // per_file:05d}.parquet"))


class PeakRSS(threading.Thread):
    """Samples RSS every ``every`` seconds: peaks of this process alone (``driver``), of all its
    descendants summed (``ray``: the Ray processes it started) and of both together (``peak``)."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.peak, self.driver, self.ray, self.stop = every, 0, 0, 0, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            mine, rest = me.memory_info().rss, 0
            for p in me.children(recursive=True):
                try:
                    rest += p.memory_info().rss
                except psutil.Error:
                    pass
            self.driver, self.ray, self.peak = max(self.driver, mine), max(self.ray, rest), max(self.peak, mine + rest)
            self.stop.wait(self.every)


def dataflow_child(n: int, work: str, checkpoint_rows: int, batch_size: int) -> None:
    """One size, in its own process (fresh Ray cluster, fresh peak): prints one JSON line."""
    import ray

    from workflows.driver import Recipe, run_recipe

    prompts = os.path.join(work, "prompts")
    write_prompts(prompts, n)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    engine = {"batch_size": batch_size, "concurrency": 2, "num_cpus": 1}
    cfg = Recipe(name="dataflow", run_dir=os.path.join(work, "run"), stages=[
        {"stage": "preference", "input": prompts, "engine_factory": "benchmarks.labeling:instant_engine",
         "checkpoint_rows": checkpoint_rows, "policy": engine, "judges": [engine]}])
    rss = PeakRSS()
    rss.start()
    start = time.perf_counter()
    info = run_recipe(cfg)["preference"]
    secs = time.perf_counter() - start
    rss.stop.set()
    rss.join()
    print(json.dumps({"n": n, "pairs": info["datasets"]["pairs"], "labels": info["outputs"], "seconds": secs,
                      "rows_per_s": info["outputs"] / secs, "judging_pairs_per_s": info["phases"]["judging"]["pairs_per_s"],
                      "peak_rss_mb": rss.peak / 2 ** 20}))


def dataflow(n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--work", work,
               "--checkpoint-rows", str(args.checkpoint_rows), "--dataflow-batch", str(args.dataflow_batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"dataflow run at {n} rows failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12, help="(a, b) red-team prompts")
    ap.add_argument("--samples", type=int, default=3, help="(a, b) responses per prompt")
    ap.add_argument("--principles", type=int, default=1, help="(a, b) principles per pair")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="(a, b) tokens per sampled response")
    ap.add_argument("--batch-size", type=int, default=16, help="(a, b) judge batch size")
    ap.add_argument("--concurrency", type=int, default=2, help="(a) judge actors")
    ap.add_argument("--rounds", type=int, default=3, help="(a, b) alternated in-process rounds, best of each")
    ap.add_argument("--dtype", default="auto",
                    help="(a, b) the stage's engines: auto (bfloat16 where the CPU computes it natively, ~2x the "
                         "float32 rate; float32 elsewhere), float32 or bfloat16; the naive loop keeps "
                         "transformers' float32 default")
    ap.add_argument("--naive-dtype", default="float32", help="(a) the naive loop's dtype")
    ap.add_argument("--skip-model", action="store_true", help="only (c)")
    ap.add_argument("--dataflow", default="100000,1000000", help="(c) sizes in prompts (= pairs), comma-separated")
    ap.add_argument("--checkpoint-rows", type=int, default=8192, help="(c) rows per raw file")
    ap.add_argument("--dataflow-batch", type=int, default=1024, help="(c) rows per engine batch")
    ap.add_argument("--backends", default="transformers",
                    help="(a) engine backends to run the stage with, comma-separated: transformers,vllm")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return dataflow_child(args.child, args.work, args.checkpoint_rows, args.dataflow_batch)
    figures: dict = {}
    if not args.skip_model:
        import ray

        from benchmarks.common import formats_line, number_formats

        formats = number_formats(args.dtype)
        print(formats_line(formats), flush=True)
        figures.update(formats)

        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        with tempfile.TemporaryDirectory() as tmp:
            infos = {b: stage_run(os.path.join(tmp, f"run-{b}"), args, b) for b in backends}
            info = infos[backends[0]]
            pairs, convs = judge_work(os.path.join(tmp, f"run-{backends[0]}", "preference"), args.principles)
        figures["engines"] = {b: {"pairs": i["phases"]["judging"]["pairs"],
                                  "judging_s": i["phases"]["judging"]["seconds"],
                                  "pairs_s": i["phases"]["judging"]["pairs_per_s"],
                                  "load_s": max((e.get("load_s") or 0.0) for e in i.get("engines") or [{}])}
                              for b, i in infos.items()}
        ray.shutdown()  # free the cores for the in-process measurements
        m = in_process(convs, args.batch_size, args.rounds, args.dtype, args.naive_dtype)
        n, judging_s = len(pairs), info["phases"]["judging"]["seconds"]
        naive_rate = n / m["naive_s"]
        figures.update({"pairs": n, "judgments": len(convs), "stage_judging_s": judging_s,
                        "stage_pairs_s": round(n / judging_s, 3), "naive_pairs_s": round(naive_rate, 3),
                        "ratio": round(n / judging_s / naive_rate, 2),
                        "engine_pairs_s": round(n / m["engine_s"], 3),
                        "steady_ratio": round(n / m["engine_s"] / naive_rate, 2),
                        "gflops": round(m["flops"] / 1e9, 1), "gflops_effective": round(m["flops_effective"] / 1e9, 1),
                        "peak_gflops": round(m["peak"] / 1e9, 1), "mfu": round(m["flops"] / m["peak"], 3),
                        "naive_dtype": args.naive_dtype,
                        "tokens": m["tokens"], "tokens_run": m["tokens_run"], "threads": m["threads"]})
        print(json.dumps(figures))
    sizes = [int(s) for s in args.dataflow.split(",") if s.strip()]
    runs = [dataflow(n, args) for n in sizes]
    for r in runs:
        print(json.dumps(r))
    if runs:
        figures.update({f"dataflow_{r['n']}_rows_s": round(r["rows_per_s"], 1) for r in runs})
        figures.update({f"dataflow_{r['n']}_rss_mb": round(r["peak_rss_mb"]) for r in runs})
        figures["rss_ratio"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 2)
    parts = []
    if {"vllm", "transformers"} <= set(figures.get("engines", {})):
        v, t = figures["engines"]["vllm"], figures["engines"]["transformers"]
        parts.append(f"engines: vllm {v['pairs_s']} judged pairs/s (engines load {v['load_s']} s) vs transformers "
                     f"{t['pairs_s']} (load {t['load_s']} s) = {v['pairs_s'] / t['pairs_s']:.2f}x")
    if "ratio" in figures:
        parts.append(f"(a) stage {figures['stage_pairs_s']} pairs/s vs naive {figures['naive_pairs_s']} = "
                     f"{figures['ratio']}x end to end ({figures['pairs']} pairs, start-up included), batched engine "
                     f"{figures['engine_pairs_s']} pairs/s = {figures['steady_ratio']}x steady state (goal >= 5x)")
        parts.append(f"(b) judge {figures['gflops']} GFLOP/s of {figures['peak_gflops']} {figures['dtype']} peak = "
                     f"{100 * figures['mfu']:.0f}% (goal >= 40%)")
    if runs:
        parts.append("(c) " + ", ".join(f"{r['n']} rows {r['rows_per_s']:.0f} rows/s peak RSS {r['peak_rss_mb']:.0f} MB"
                                        for r in runs) + f", RSS ratio {figures['rss_ratio']} (goal <= 1.5)")
    print("labeling: " + "; ".join(parts))


if __name__ == "__main__":
    main()
