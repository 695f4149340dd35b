"""RL-CAI (the ``ppo``, ``grpo`` and ``online_dpo`` stages) with the embedded model: where an iteration's time goes, how fast the
engine actors roll out against the trainer generating by itself, and what a weight sync costs by
model size — each measured in one run.

    python benchmarks/rl.py [--iterations 4] [--prompts 8] [--samples 2] [--max-new-tokens 48]
                            [--backends transformers,vllm] [--algorithms ppo,grpo,online_dpo] [--lora 16]

1. The ``ppo`` stage runs ``--iterations`` on 2 workers (ZeRO-2, ``precision: auto``) with a
   reward model made of the embedded backbone and a fixed random head; the first iteration is a
   warm-up and left out. Seconds per iteration are split into generate, score (policy, reference
   and reward-model forward passes), train and sync (gathering the weights and loading them into
   the rollout actor). Goal: sync under 10% of an iteration.
2. Rollout tokens/s of the engine actor (from the same run) versus the trainer calling
   ``model.generate`` on its own training copy of the model (float32, loaded as the training jobs
   load it, ``use_cache`` off as training leaves it), same prompts, same thread count.
3. ``--algorithms ppo,grpo,online_dpo``: the ``grpo`` stage the same way (GRPO's defaults: k3 KL
   in the loss, group-scaled advantages), its iteration split into the same four shares, and the
   ``online_dpo`` stage (the same reward model as its labeler), each round split into generate,
   label, train and sync.
4. Weight-sync seconds versus model size: a tiny model and the embedded one, each pushed to a
   fresh rollout actor through the object store.
5. ``--lora R`` (default 16): the last algorithm again with rank-R LoRA adapters — a sync then
   sends the adapters alone — against its full-weight run: megabytes and seconds per sync.

``--backends``: 1 and 3 once per rollout engine backend (``vllm`` where vLLM is installed), the
same prompts and seed; the last line gives each one's rollout tokens/s, sync seconds and load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reward_dir(model_dir: str, out: str) -> str:
    """The model's backbone with a fixed random reward head, in the reward stage's export layout."""
    import torch
    from transformers import AutoConfig

    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, 1)
    torch.save({"weight": head.weight.detach(), "bias": head.bias.detach()}, os.path.join(out, "reward_head.pt"))
    with open(os.path.join(out, "reward_head.json"), "w") as f:
        json.dump({"hidden_size": hidden, "mean": 0.0, "std": 1.0, "normalize": False, "max_length": 512}, f)
    return out


def prompts_dataset(out: str, n: int) -> tuple[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.prompt_sources import BUILTIN_DIR

    lines = (BUILTIN_DIR / "red_team.jsonl").read_text().splitlines()[:n]
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": json.loads(x)["prompt"]}]}
            for i, x in enumerate(lines)]
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "part-00000.parquet"))
    return out, rows


def stage_run(model: str, rm: str, prompts: str, run_dir: str, args, backend: str = "transformers",
              algorithm: str = "ppo", lora: int | None = None) -> list[dict]:
    """The ``ppo`` stage (or ``grpo``: the same job, GRPO's defaults; or ``online_dpo``) on the
    benchmark's prompts; ``lora``: train rank-``lora`` adapters, so each sync sends them alone."""
    from training import online_dpo, ppo
    from training.config import GRPOConfig, OnlineDPOConfig, PPOConfig
    from workflows.core.stage import StageContext
    from workflows.core.typed import from_dict

    common = {"model": model, "reward_model": rm, "input": prompts, "samples_per_prompt": args.samples,
              "max_new_tokens": args.max_new_tokens, "num_workers": 2, "zero_stage": 2, "micro_batch_size": 4,
              "lr": 2e-6, "checkpoint_every": 0, "rollout": {"backend": backend, "batch_size": args.prompts * args.samples},
              **({"lora": {"r": lora, "alpha": 2 * lora}} if lora else {})}
    if algorithm == "online_dpo":  # its rounds are the others' iterations; the reward model labels
        cfg = from_dict(OnlineDPOConfig, {**common, "labeler": "reward_model", "rounds": args.iterations,
                                          "prompts_per_round": args.prompts}, "benchmark")
    else:
        cfg = from_dict(GRPOConfig if algorithm == "grpo" else PPOConfig,
                        {**common, "iterations": args.iterations, "prompts_per_iteration": args.prompts}, "benchmark")
    run = {"ppo": ppo.run, "grpo": ppo.run_grpo, "online_dpo": online_dpo.run}[algorithm]
    run(cfg, StageContext(run_dir, algorithm, seed=0))
    with open(os.path.join(run_dir, algorithm, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


PARTS = ("generate_s", "score_s", "label_s", "train_s", "sync_s")  # online DPO labels where the others score


def shares(per: dict) -> str:
    """An iteration's seconds and the share of each part."""
    return (f"{per['seconds']:.1f} s = " + " + ".join(f"{k[:-2]} {per[k]:.1f} s ({per[k] / per['seconds']:.0%})"
                                                     for k in PARTS if k in per))


def trainer_generate(model: str, rows: list, args, threads: int) -> float:
    """Tokens/s of ``model.generate`` on the training copy of the model (see the docstring)."""
    import torch

    from actors.models import chat_prompt_ids, load_tokenizer
    from training.config import PPOConfig
    from training.core import load_lm

    torch.set_num_threads(threads)
    tok, lm = load_tokenizer(model), load_lm(model, PPOConfig()).eval()
    convs = [r["messages"] for r in rows[:args.prompts] for _ in range(args.samples)]
    ids = [chat_prompt_ids(tok, c) for c in convs]
    width = max(map(len, ids))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t = time.perf_counter()
    with torch.no_grad():
        out = lm.generate(input_ids=batch, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=True,
                          temperature=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    new = (out[:, width:] != tok.pad_token_id).sum().item()
    return new / (time.perf_counter() - t)


def sync_cost(model: str, backend: str = "transformers") -> tuple[float, float]:
    """(megabytes, seconds) of one push of ``model``'s weights to a fresh rollout actor."""
    import ray

    from actors import EngineConfig
    from actors.models import load_causal_lm
    from training.rollouts import RolloutActor, push_weights

    sd = {k: v.float() for k, v in load_causal_lm(model, dtype="float32", device="cpu").state_dict().items()}
    mb = sum(v.numel() * v.element_size() for v in sd.values()) / 1e6
    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(EngineConfig(backend=backend, model=model, dtype="float32"))
    ray.get(actor.__ray_ready__.remote())
    t = time.perf_counter()
    push_weights([actor], sd, 1)
    seconds = time.perf_counter() - t
    ray.kill(actor)
    return mb, seconds


def tiny_model(out: str, base: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(base)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=32)).save_pretrained(out)  # vLLM's CPU attention has no heads of 16
    tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--backends", default="transformers", help="rollout engine backends, comma-separated")
    p.add_argument("--algorithms", default="ppo,grpo,online_dpo", help="stages to run, comma-separated (ppo "
                   "first: the rollout and sync figures come from it)")
    p.add_argument("--lora", type=int, default=16, metavar="R",
                   help="also run the last algorithm with rank-R LoRA adapters (needs .[lora]) and compare a "
                        "sync of the adapters alone with a sync of the full weights; 0: skip")
    args = p.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or algorithms[0] != "ppo" or not set(algorithms) <= {"ppo", "grpo", "online_dpo"}:
        p.error("--algorithms: ppo, then any of grpo and online_dpo (e.g. ppo,grpo,online_dpo)")
    import ray

    from actors.models import prepare_model
    from benchmarks.common import formats_line, number_formats

    print(formats_line(number_formats()), flush=True)
    model = prepare_model("embedded").path
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.path.dirname(HERE)}})
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts, rows = prompts_dataset(os.path.join(tmp, "prompts"), args.prompts * 2)
        rm = reward_dir(model, os.path.join(tmp, "rm"))
        tiny = tiny_model(os.path.join(tmp, "tiny"), model)
        others: dict[tuple[str, str], dict] = {}
        for backend in backends:
            for algorithm in algorithms:
                hist = stage_run(model, rm, prompts, os.path.join(tmp, f"run-{backend}"), args, backend, algorithm)
                steady = hist[1:] or hist
                per = {k: sum(h[k] for h in steady) / len(steady) for k in ("seconds", "sync_mb", *PARTS)
                       if k in steady[0]}
                if "response_length" in steady[0]:  # ppo and grpo log it; online DPO's rounds do not
                    tokens = sum(h["response_length"] * args.prompts * args.samples for h in steady)
                    per["actor_tps"] = tokens / sum(h["generate_s"] for h in steady)
                print(f"[{backend}] {algorithm} iteration (steady, {len(steady)} of {len(hist)}): {shares(per)}"
                      + ("; goal: sync < 10%" if algorithm == "ppo" else ""), flush=True)
                if algorithm == "ppo":
                    figures[backend] = per
                else:
                    others[(algorithm, backend)] = per
            if args.lora:  # the same stage, adapters only: what a sync sends and costs
                last = algorithms[-1]
                run_dir = os.path.join(tmp, f"run-{backend}-lora")
                hist = stage_run(model, rm, prompts, run_dir, args, backend, last, lora=args.lora)
                steady = hist[1:] or hist
                full = figures[backend] if last == "ppo" else others[(last, backend)]
                lora_sync = sum(h["sync_s"] for h in steady) / len(steady)
                others[("lora", backend)] = {"algorithm": last, "mb": steady[-1]["sync_mb"], "s": lora_sync,
                                             "full_mb": hist[-1].get("full_mb") or full.get("sync_mb"),
                                             "full_s": full["sync_s"]}
                print(f"[{backend}] {last} with LoRA r{args.lora}: sync {steady[-1]['sync_mb']:.1f} MB in "
                      f"{lora_sync:.2f} s per iteration, against {full['sync_mb']:.0f} MB in {full['sync_s']:.2f} s "
                      "with the full weights", flush=True)
            if backend not in figures:
                continue
            per = figures[backend]
            per["sizes"] = [sync_cost(tiny, backend), sync_cost(model, backend)]
            for mb, s in per["sizes"]:
                print(f"[{backend}] weight sync: {mb:.0f} MB in {s:.2f} s ({mb / s:.0f} MB/s)")
        trainer_tps = trainer_generate(model, rows, args, threads=1)
        first = figures[backends[0]]
        print(f"rollout tokens/s: engine actor ({backends[0]}) {first['actor_tps']:.1f}, the trainer's own "
              f"model.generate {trainer_tps:.1f} (same prompts, 1 thread each): {first['actor_tps'] / trainer_tps:.2f}x")
    mb, s = first["sizes"][-1]
    line = (f"rl: iteration {first['seconds']:.1f} s, sync {first['sync_s'] / first['seconds']:.1%} of it (goal < 10%); "
            f"engine-actor rollouts {first['actor_tps'] / trainer_tps:.2f}x the trainer's own generate; "
            f"weight sync {mb / s:.0f} MB/s at {mb:.0f} MB")
    for (algorithm, backend), per in others.items():
        if algorithm == "lora":
            line += (f"; {per['algorithm']} ({backend}) sync with LoRA r{args.lora}: {per['mb']:.1f} MB in {per['s']:.2f} s "
                     f"vs full weights {per['full_mb']:.0f} MB in {per['full_s']:.2f} s "
                     f"({per['full_mb'] / max(per['mb'], 1e-9):.0f}x fewer bytes, "
                     f"{per['full_s'] / max(per['s'], 1e-9):.1f}x faster)")
            continue
        line += f"; {algorithm} ({backend}) {'round' if algorithm == 'online_dpo' else 'iteration'} {shares(per)}"
    if {"transformers", "vllm"} <= set(figures):
        v, t = figures["vllm"], figures["transformers"]
        line += (f"; rollouts vllm {v['actor_tps']:.1f} vs transformers {t['actor_tps']:.1f} tok/s = "
                 f"{v['actor_tps'] / t['actor_tps']:.2f}x, sync {v['sync_s']:.2f} vs {t['sync_s']:.2f} s per iteration")
    print(line)


if __name__ == "__main__":
    main()
