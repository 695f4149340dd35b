"""SFT tokens/s of the Ray Train + DeepSpeed path (``cai``'s ``sft`` stage, N workers over gloo)
versus a plain single-process PyTorch loop, same model, same rows, same global batch, same
optimizer (AdamW), measured in one run.

    python benchmarks/training.py [--model embedded] [--workers 2] [--steps 8] [--zero-stage 0]

Both sides count real (unpadded) tokens and time optimizer steps only: the first step of each is
a warm-up and left out, and neither side's model load or start-up is in the steady-state figure.
The plain loop runs one process with every core as torch threads and a micro-batch of
``workers × micro_batch`` rows, which is the best a single process does on this machine; the Ray
side runs ``workers`` processes of ``cpus / workers`` threads each, reducing gradients over gloo.
The end-to-end figure of the Ray side (Ray Train start-up, data read, tokenization, DeepSpeed
initialisation, export) is printed too. Goal: steady-state ratio ≥ 0.8.

The Ray side trains in ``--precision auto``: bf16 (fp32 master weights) on CPUs that compute
bf16 natively, fp32 elsewhere; the first line printed names the processor, the choice and both
matmul peaks. The plain loop is the naive baseline and trains in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

# This file is named like the `training` package: take its folder off the import path (Ray
# hands the driver's path to its workers too) and put the repository root there instead.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("I can't help with that, but here is some general and safe information that may be useful: "
         "talk to a qualified professional, check official guidance, and keep yourself and others safe.").split()


def sft_rows(n: int, answer_words: int, seed: int = 0) -> list[dict]:
    """``n`` SFT rows (TRL ``messages``) from the shipped prompts, answers of ``answer_words`` words."""
    from workflows.prompt_sources import PromptsConfig, iter_prompt_rows

    prompts = [r["messages"] for name in ("red_team", "helpful")
               for r in iter_prompt_rows(PromptsConfig(path=f"builtin:{name}")) if r["_error"] is None]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(answer_words))
        rows.append({"prompt_id": f"bench-{i:05d}",
                     "messages": prompts[i % len(prompts)] + [{"role": "assistant", "content": answer}]})
    return rows


def steady(history: list[dict]) -> tuple[int, float]:
    """Tokens and seconds of every step after the first."""
    rest = history[1:]
    return sum(int(h["tokens"]) for h in rest), sum(float(h["seconds"]) for h in rest)


def ray_path(data_dir: str, run_dir: str, args) -> dict:
    from workflows.driver import Recipe, run_recipe

    cpus = os.cpu_count() or 1
    cfg = Recipe(name="bench-training", run_dir=run_dir, stages=[{
        "stage": "sft", "model": args.model, "input": data_dir, "num_workers": args.workers,
        "cpus_per_worker": max(1.0, cpus / args.workers), "zero_stage": args.zero_stage,
        "micro_batch_size": args.micro_batch, "grad_accum": 1, "max_steps": args.steps, "eval_fraction": 0.0,
        "checkpoint_every": 0, "max_length": args.max_length, "lr": 1e-5, "group_by_length": True,
        "precision": args.precision}])
    started = time.perf_counter()
    info = run_recipe(cfg)["sft"]
    wall = time.perf_counter() - started
    with open(os.path.join(run_dir, "sft", "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    tokens, secs = steady(history)
    return {"tokens": tokens, "seconds": secs, "all_tokens": sum(h["tokens"] for h in history), "wall": wall,
            "steps": info["steps"], "precision": info["training"]["precision"],
            "precision_reason": info["training"].get("precision_reason", "")}


def plain_loop(rows: list[dict], args) -> dict:
    """One process, torch threads = all cores, AdamW, global batch = workers × micro_batch."""
    import torch

    from actors.models import load_causal_lm, load_tokenizer
    from training.core import token_count
    from training.data import collate_sft, length_grouped_batches, tokenize_rows, tokenize_sft
    from training.losses import sft_loss

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=torch.float32, device="cpu")
    model.config.use_cache = False
    model.train()
    items, _ = tokenize_rows(tokenize_sft, tok, rows, args.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = length_grouped_batches([len(x) for x in items], args.micro_batch * args.workers, seed=0)
    history = []
    for b in batches[:args.steps]:
        t0 = time.perf_counter()
        batch = collate_sft([items[i] for i in b], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = sft_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"tokens": token_count(batch), "seconds": time.perf_counter() - t0, "loss": loss.item()})
    tokens, secs = steady(history)
    return {"tokens": tokens, "seconds": secs, "steps": len(history)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="model spec: `embedded`, a directory or a .gguf")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    ap.add_argument("--zero-stage", type=int, default=0,
                    help="DeepSpeed ZeRO stage; 0 (plain data parallel) suits a model that fits each worker, "
                         "2 and 3 trade extra gloo traffic for memory")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per worker per step")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps on each side (the first is a warm-up)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--answer-words", type=int, default=60)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the Ray side's precision: auto = bf16 where the CPU computes it natively, else fp32 "
                         "(the plain loop always trains in fp32, transformers' default)")
    args = ap.parse_args()
    from benchmarks.common import formats_line, number_formats

    formats = number_formats()
    print(formats_line(formats), flush=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sft_rows(args.steps * args.workers * args.micro_batch, args.answer_words)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "sft_data")
        os.makedirs(data)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(data, "part-00000.parquet"))
        dist = ray_path(data, os.path.join(tmp, "run"), args)
    import ray

    ray.shutdown()  # give the plain loop every core
    plain = plain_loop(rows, args)
    d_rate, p_rate = dist["tokens"] / dist["seconds"], plain["tokens"] / plain["seconds"]
    e2e_rate = dist["all_tokens"] / dist["wall"]
    figures = {"model": args.model, "workers": args.workers, "zero_stage": args.zero_stage,
               "global_batch": args.workers * args.micro_batch, "steps": args.steps,
               "ray_tokens": dist["tokens"], "ray_s": round(dist["seconds"], 2), "ray_tok_s": round(d_rate, 1),
               "ray_end_to_end_tok_s": round(e2e_rate, 1), "ray_wall_s": round(dist["wall"], 1),
               "plain_tokens": plain["tokens"], "plain_s": round(plain["seconds"], 2), "plain_tok_s": round(p_rate, 1),
               "ratio": round(d_rate / p_rate, 3), "end_to_end_ratio": round(e2e_rate / p_rate, 3), "goal": 0.8,
               "ray_precision": dist["precision"], "ray_precision_reason": dist["precision_reason"],
               "plain_precision": "fp32", **formats}
    print(json.dumps(figures))
    print(f"training: Ray Train + DeepSpeed ZeRO-{args.zero_stage} on {args.workers} workers {d_rate:.0f} tok/s vs "
          f"plain loop {p_rate:.0f} tok/s = {d_rate / p_rate:.2f}x (goal >= 0.8; end to end incl. start-up "
          f"{e2e_rate / p_rate:.2f}x; {args.model}, global batch {args.workers * args.micro_batch}, {args.steps} steps; "
          f"Ray side {dist['precision']}, plain loop fp32)")


if __name__ == "__main__":
    main()
