"""Online (iterative) DPO job: the policy labels its own answers round after round, on Ray Train +
DeepSpeed, with rollouts from the engine actors ``ppo`` uses.

Per round (``rounds`` of them):

1. **answers** — rank 0 has the rollout actors (holding the current policy version) answer the
   round's ``prompts_per_round`` prompts ``samples_per_prompt`` times; every rank gets them and
   takes its share of the prompts, all answers of a prompt together.
2. **labels** — each rank scores its answers with the ``labeler`` (``rules``: the prompt's
   category and the refusal classifier; ``reward_model``: the reward stage's model or
   ``reward_fn``), less ``end_penalty`` for an answer that never ended, and pairs each prompt's
   best answer (chosen) with its worst (rejected); a prompt whose answers all tie makes no pair —
   or, with ``on_tie: reference``, a pair of its reference answer over one of them where the
   labeler scores the reference higher (``chosen_from``: policy or reference).
   Rank 0 writes the round's pairs to ``pairs/round-NNNN.parquet`` — TRL's conversational
   preference columns (``prompt``, ``chosen``, ``rejected``) plus ``pair_id``, ``prompt_id``,
   ``round``, ``policy_version``, both scores and the labeler.
3. **DPO** — the frozen starting model's sequence log-probs of both answers, then ``dpo_epochs``
   passes of ``micro_batch_size`` pairs per step (sigmoid or IPO, ``beta``). Ranks with fewer
   pairs than the busiest pad their last steps with weight-0 pairs, so every rank steps together.
4. **sync** — the new weights into every rollout actor, the next policy version.

Checkpoints every ``checkpoint_every`` rounds (the round's pairs are written first): a failed
worker or a rerun continues from the last one. Metrics per round go to ``metrics.jsonl`` and
``loss.png``; the exported directory is the policy, a Hugging Face causal LM.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from actors.models import load_causal_lm, load_tokenizer
from training import checkpoints, core, ppo, rollouts, runner
from training.config import OnlineDPOConfig
from training.losses import dpo_loss
from training.reward import load_reward_model
from training.rl import best_worst, end_penalty
from training.worker import JobSpec, ProgressFile, WorkerSettings, all_reduce, deepspeed_config, lr_lambda, setup_worker
from workflows.core import storage
from workflows.core.ids import ID_HEX
from workflows.core.refusal import is_refusal
from workflows.core.stage import StageContext

PAIRS_DIR = "pairs"


def round_file(r: int) -> str:
    """The dataset file of round ``r`` (1-based) inside the stage directory."""
    return f"{PAIRS_DIR}/round-{r:04d}.parquet"


def round_pair_id(prompt_id: str, r: int, slot: int, chosen: str, rejected: str) -> str:
    """A pair's id: its prompt, round, place in the round (a prompt may come twice) and answers."""
    doc = json.dumps([prompt_id, r, slot, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(doc.encode()).hexdigest()[:ID_HEX]


def _seq_logps(model, batch: dict, mb: int, grad: bool) -> torch.Tensor:
    """Each row's summed log-prob of its response tokens (temperature 1)."""
    if grad:
        lp, _, _ = ppo.forward(model, batch, 1.0, values=False)
    else:
        lp, _ = ppo.forward_chunked(model, batch, 1.0, False, mb)
    return (lp.float() * batch["resp_mask"]).sum(-1)


def _pair_batch(tok, pairs: list[dict], device) -> dict:
    """Chosen answers first, then rejected, as ``ppo.build_batch`` lays sequences out."""
    samples = [p["chosen_sample"] for p in pairs] + [p["rejected_sample"] for p in pairs]
    return ppo.build_batch(tok, samples, device)


def _reference_sample(first: dict, references: dict, tok, max_new_tokens: int) -> dict:
    """A tied prompt's reference answer (its own, else the starting policy's) as a sample of that
    prompt: cut to ``max_new_tokens`` tokens like a rollout, ended (EOS) when it fits."""
    text = first.get("reference") or references[first["prompt_id"]]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ended = len(ids) < max_new_tokens
    ids = ids + [tok.eos_token_id] if ended else ids[:max_new_tokens]
    return {**first, "text": text if ended else tok.decode(ids, skip_special_tokens=True), "token_ids": ids,
            "ended": ended}


def _pair(c: dict, j: dict, cs: float, js: float, cfg: OnlineDPOConfig, r: int, version: int, source: str) -> dict:
    return {"pair_id": round_pair_id(c["prompt_id"], r, c["slot"], c["text"], j["text"]), "prompt_id": c["prompt_id"],
            "prompt": list(c["messages"]), "chosen": [{"role": "assistant", "content": c["text"]}],
            "rejected": [{"role": "assistant", "content": j["text"]}], "round": r, "policy_version": version,
            "chosen_score": cs, "rejected_score": js, "labeler": cfg.labeler, "chosen_from": source,
            "chosen_sample": c, "rejected_sample": j}


def _label(samples: list[dict], cfg: OnlineDPOConfig, rm, rm_tok, r: int, version: int,
           references: dict | None = None, tok=None) -> tuple[list[dict], dict]:
    """This rank's pairs from its answers, and its counts (answers, prompts, ties, score sums).
    With ``on_tie: reference`` a tied prompt's reference answer (``_reference_sample``) is scored
    the same way and, where it scores higher, chosen over the prompt's first answer."""
    n = cfg.samples_per_prompt
    raw = ppo.scores_of(samples, cfg, rm, rm_tok)
    ended = torch.tensor([s["ended"] for s in samples])
    scores = end_penalty(raw, ended, cfg.end_penalty).tolist()
    hits = best_worst(scores, n)
    pairs = [_pair(samples[h[0]], samples[h[1]], scores[h[0]], scores[h[1]], cfg, r, version, "policy")
             for h in hits if h is not None]
    tied = [g * n for g, h in enumerate(hits) if h is None]
    if cfg.on_tie == "reference" and tied:
        refs = [_reference_sample(samples[i], references or {}, tok, cfg.max_new_tokens) for i in tied]
        ref_scores = end_penalty(ppo.scores_of(refs, cfg, rm, rm_tok), torch.tensor([x["ended"] for x in refs]),
                                 cfg.end_penalty).tolist()
        pairs += [_pair(ref, samples[i], sc, scores[i], cfg, r, version, "reference")
                  for i, ref, sc in zip(tied, refs, ref_scores) if sc - scores[i] > 1e-6]
    counts = {"n": float(len(samples)), "prompts": float(len(samples) // n), "pairs": float(len(pairs)),
              "from_reference": float(sum(p["chosen_from"] == "reference" for p in pairs)),
              "score": float(sum(raw.tolist())), "unfinished": float((~ended).sum())}
    if cfg.labeler == "rules":  # the evaluation's two refusal figures, on this round's answers
        refused = [is_refusal(s["text"]) for s in samples]
        counts.update({"harmful_n": float(sum(s["harmful"] for s in samples)),
                       "harmful_refused": float(sum(x for x, s in zip(refused, samples) if s["harmful"])),
                       "other_refused": float(sum(x for x, s in zip(refused, samples) if not s["harmful"]))})
    return pairs, counts


def _write_round(spec: JobSpec, r: int, pairs: list[dict]) -> None:
    """Rank 0: the round's pairs from every rank, as one parquet file (TRL columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, [{k: v for k, v in p.items() if not k.endswith("_sample")} for p in pairs])
    if dist.get_rank() != 0:
        return
    rows = [p for part in box for p in part]
    fs, path = storage.resolve(spec.path(round_file(r)))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    schema = pa.schema([("pair_id", pa.string()), ("prompt_id", pa.string()),
                        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("chosen", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("rejected", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("round", pa.int32()), ("policy_version", pa.int32()), ("chosen_score", pa.float64()),
                        ("rejected_score", pa.float64()), ("labeler", pa.string()), ("chosen_from", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, filesystem=fs)


def _train_round(engine, ref, tok, cfg: OnlineDPOConfig, pairs: list[dict], samples: list[dict], device,
                 it: int) -> dict:
    """``dpo_epochs`` passes over this rank's pairs. Every rank takes the busiest rank's number of
    steps: one that runs out steps on a weight-0 pair (of its own answers when it has no pair), so
    the collectives match. Summed stats and ``steps`` (real ones), or {} when no rank had a pair."""
    mb = cfg.micro_batch_size
    most = int(all_reduce([float(len(pairs))], op=dist.ReduceOp.MAX)[0])
    if most == 0:
        return {}
    pad = pairs[:1] or [{"chosen_sample": samples[0], "rejected_sample": samples[1]}]
    with torch.no_grad():
        ref_lp = _seq_logps(ref, _pair_batch(tok, pairs + pad, device), mb, grad=False)
    k = len(pairs) + 1
    ref_c, ref_r = ref_lp[:k], ref_lp[k:]  # pairs, then the pad pair last
    sums: dict[str, float] = {}
    for epoch in range(cfg.dpo_epochs):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(epoch + 7919 * it)).tolist()
        for step in range(-(-most // mb)):
            idx = order[step * mb:(step + 1) * mb]
            real = bool(idx)
            idx = idx or [k - 1]
            sub = [(pairs + pad)[i] for i in idx]
            batch = _pair_batch(tok, sub, device)
            lp = _seq_logps(engine, batch, mb, grad=True)
            b, at = len(sub), torch.tensor(idx)
            rc, rr = ref_c[at].to(lp.device), ref_r[at].to(lp.device)
            w = torch.full((b,), 1.0 if real else 0.0, device=lp.device)
            nll = -lp[:b] / batch["resp_mask"][:b].sum(-1).clamp(min=1)  # per token: RPO's term
            loss, cr, rj = dpo_loss(lp[:b], lp[b:], rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, weights=w,
                                    rpo_alpha=cfg.rpo_alpha, chosen_nll=nll)
            engine.backward(loss)
            engine.step()
            if real:
                kl = ((lp[:b] - rc) + (lp[b:] - rr)).detach().mean().item() / 2
                for key, x in {"loss": loss.item(), "reward_margin": (cr - rj).mean().item(),
                               "reward_accuracy": (cr > rj).float().mean().item(), "kl": kl, "steps": 1.0}.items():
                    sums[key] = sums.get(key, 0.0) + x
    return sums


def train_loop(spec: JobSpec) -> None:
    """Ray Train worker entry: the rounds of the module docstring, then the export."""
    import deepspeed
    import ray

    cfg: OnlineDPOConfig = spec.cfg
    given: ppo.PromptInputs = spec.inputs
    ws = setup_worker(spec)
    rank, world, device, dtype = ws.rank, ws.world_size, ws.device, ws.dtype
    tok = load_tokenizer(spec.model)
    lm = core.load_lm(spec.model, cfg)
    for m in lm.modules():  # the log-probs of a pair must not depend on dropout draws
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ref = load_causal_lm(spec.model, dtype=dtype, device=device).eval().requires_grad_(False)
    rm = rm_tok = None
    if cfg.labeler == "reward_model" and not cfg.reward_fn:
        rm, rm_tok = load_reward_model(given.reward_dir, dtype=dtype, device=device).requires_grad_(False), \
            load_tokenizer(given.reward_dir)
    per_rank = cfg.prompts_per_round // world
    total = cfg.rounds * cfg.dpo_epochs * max(1, -(-per_rank // cfg.micro_batch_size))  # optimizer steps, at most
    engine, _, _, _ = deepspeed.initialize(
        model=lm, model_parameters=[p for p in lm.parameters() if p.requires_grad], config=deepspeed_config(cfg, ws.precision),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total)))
    prompts = ray.get(given.prompts)
    state = checkpoints.restore(engine, {"step": 0, "history": [], "resumes": 0, "resumed_from": [], "version": 0,
                                         "examples": []}, spec.stage_dir, spec.job)
    actors = rollouts.start_actors(cfg, given.actor_cpus, spec.model) if rank == 0 else []
    judges = rollouts.start_judges(cfg, given.judge_cpus) if rank == 0 and cfg.labeler == "judge" else []
    if state["version"] > 0:  # a resumed run: fresh actors hold the starting weights
        ppo.sync(engine, cfg, ws, actors, state["version"], prefix="")
    elif (judges and cfg.judge.against == "reference") or cfg.on_tie == "reference":
        box = [rollouts.starting_answers(actors, prompts, cfg) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # on_tie: every rank labels its own share of prompts
        state["references"] = box[0]
    P, n = cfg.prompts_per_round, cfg.samples_per_prompt
    progress = ProgressFile(spec, rank, cfg.rounds, "rounds")
    while state["step"] < cfg.rounds:
        it = state["step"]
        ppo.fail_once(spec, cfg, it, rank)
        t0 = time.time()
        everything = ppo.sample(actors, prompts, cfg, spec.seed, it, state["version"], rank)
        t_gen = time.time() - t0
        judge = rollouts.judged(judges, everything, cfg, spec.seed, it, rank, state.get("references")) \
            if cfg.labeler == "judge" else {}
        groups = [everything[g * n:(g + 1) * n] for g in range(P)]
        samples = [s for g in groups[rank::world] for s in g]
        pairs, counts = _label(samples, cfg, rm, rm_tok, it + 1, state["version"], state.get("references"), tok)
        _write_round(spec, it + 1, pairs)
        t_label = time.time() - t0 - t_gen
        stats = _train_round(engine, ref, tok, cfg, pairs, samples, device, it)
        t_train = time.time() - t0 - t_gen - t_label
        trained = bool(all_reduce([float(bool(stats))], op=dist.ReduceOp.MAX)[0])
        t_sync, sent = 0.0, 0
        if trained:
            state["version"] += 1
            t_sync, sent = ppo.sync(engine, cfg, ws, actors, state["version"], prefix="")
        keys = sorted(counts)
        sums = dict(zip(keys, all_reduce([counts[k] for k in keys])))
        skeys = ("loss", "reward_margin", "reward_accuracy", "kl", "steps")
        st = dict(zip(skeys, all_reduce([stats.get(k, 0.0) for k in skeys])))
        rec = {"step": it + 1, "round": it + 1, "pairs": int(sums["pairs"]), "ties": int(sums["prompts"] - sums["pairs"]),
               **({"from_reference": int(sums["from_reference"])} if cfg.on_tie == "reference" else {}),
               "score": sums["score"] / sums["n"], "unfinished": sums["unfinished"] / sums["n"],
               **{k: st[k] / st["steps"] for k in skeys[:-1] if st["steps"]}, **ppo.refusal_rates(sums),
               "seconds": round(time.time() - t0, 3), "generate_s": round(t_gen, 3), "label_s": round(t_label, 3),
               "train_s": round(t_train, 3), "sync_s": round(t_sync, 3), **judge,
               "sync_mb": round(all_reduce([sent])[0] / 1e6, 3), "policy_version": state["version"]}
        if rank == 0:
            print(f"[online_dpo] round {it + 1}/{cfg.rounds}: {rec['pairs']} pairs, {rec['ties']} ties, "
                  f"score {rec['score']:.3f}, loss {rec.get('loss', float('nan')):.4f}", file=sys.__stdout__, flush=True)
        ppo.close_iteration(engine, state, rec, everything, n, cfg.rounds, cfg.checkpoint_every, progress)
    _finish(engine, spec, ws, state, actors, tok, prompts)


def _finish(engine, spec: JobSpec, ws: WorkerSettings, state: dict, actors: list, tok, prompts: list) -> None:
    cfg: OnlineDPOConfig = spec.cfg
    ppo.last_answers(spec, ws, state, actors)
    hist = state["history"]
    core.finish(engine, spec, ws, hist, lambda sd, d: core.save_lm(sd, d, engine.module, cfg, tok), "online DPO",
                head={"algorithm": "online_dpo", "iterations": state["step"], "labeler": cfg.labeler},
                tail={"first": hist[0] if hist else None, "last": hist[-1] if hist else None,
                      "examples": state["examples"], "resumes": state["resumes"],
                      "resumed_from_iterations": state["resumed_from"], "prompts": len(prompts),
                      "pairs": sum(h["pairs"] for h in hist), "ties": sum(h["ties"] for h in hist),
                      "rollouts": state["step"] * cfg.prompts_per_round * cfg.samples_per_prompt,
                      **ppo.lora_sizes(engine, cfg), **ppo.largest_push(hist)},
                metrics={"round": state["step"]})


def report(ctx: StageContext, s: dict) -> runner.StageReport:
    """Online DPO's report: first versus last round, pairs and ties, where the time went."""
    first, last = s["first"] or {}, s["last"] or {}
    keys = ("score", "pairs", *(("from_reference",) if "from_reference" in last else ()), "ties", "loss",
            "reward_margin", "reward_accuracy", "kl", "unfinished",
            *(("harmful_refused", "other_refused") if "harmful_refused" in last else ()))
    lines = [f"online DPO: {s['iterations']} rounds, {s['rollouts']} answers labeled by the {s['labeler']} labeler "
             f"into {s['pairs']} pairs ({s['ties']} prompts tied, no pair), on {s['world_size']} workers "
             f"(ZeRO-{s['zero_stage']}, {s['precision']}), resumed {s['resumes']}× in {s['seconds']:.0f} s",
             *ppo.change_lines(first, last, keys, "round", ("generate_s", "label_s", "train_s", "sync_s")),
             *filter(None, [rollouts.judge_line(last)]), ppo.sync_line(s, last),
             f"pairs of every round (TRL columns): `{ctx.path(PAIRS_DIR)}`; model: `{s['model_dir']}`"]
    return ppo.report_with(ctx, s, lines)


def run(cfg: OnlineDPOConfig, ctx: StageContext) -> dict:
    """The ``online_dpo`` stage: rounds of answers, labels and DPO on ``input`` prompts."""
    return runner.run_job("online_dpo", train_loop, cfg, ctx, ppo.read_inputs, report)
