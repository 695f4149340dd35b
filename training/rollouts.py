"""The rollout side of the RL jobs (ppo, grpo, online_dpo): engine actors that hold the policy being
trained, generate for rank 0, and take new weights through the object store — full weights, or
LoRA adapters merged into the starting weights on the actor — and, for ``reward: judge`` /
``labeler: judge``, the judge's engine actors beside them, which compare each prompt's answers."""
from __future__ import annotations

import dataclasses
import functools
import time

import torch.distributed as dist

from actors import EngineConfig, SamplingParams
from actors.base import check_policy_version
from actors.models import load_causal_lm
from actors.pool import start_engine
from training import core, judging
from workflows.core.constitution import load_constitution
from workflows.core.errors import DataError


class RolloutActor:
    """A Ray actor holding one engine: generates, takes new weights bucket by bucket, loads them.
    Under LoRA only the adapters travel: the actor merges them into its own copy of the starting
    weights (read once from the model directory it loaded) and loads the result."""

    def __init__(self, engine_cfg: EngineConfig, factory: str | None = None):
        self.engine, self.pending, self.model, self.base = start_engine(engine_cfg, None, factory), {}, \
            engine_cfg.model, None

    def generate(self, conversations, params):
        return self.engine.generate(conversations, params)

    def choice_logprobs(self, conversations, choices):
        return self.engine.choice_logprobs(conversations, choices)

    def receive(self, bucket: dict) -> int:
        self.pending.update(bucket)
        return len(self.pending)

    def load_weights(self, version: int) -> int:
        weights, self.pending = self.pending, {}
        self.engine.load_weights(weights, version)
        return version

    def load_adapter(self, version: int, scale: float) -> int:
        adapters, self.pending = self.pending, {}
        if self.base is None:
            self.base = load_causal_lm(self.model, dtype="float32", device="cpu").state_dict()
        self.engine.load_weights({**self.base, **core.merge_adapters(self.base, adapters, scale)}, version)
        return version


def start_actors(cfg, cpus: float, model: str) -> list:
    """``rollout.concurrency`` engine actors holding the starting policy ``model`` (``rollout.model``
    is ignored: rollouts always come from the policy being trained)."""
    import ray

    remote = ray.remote(RolloutActor).options(num_cpus=cpus, num_gpus=cfg.rollout.num_gpus)
    engine = dataclasses.replace(cfg.rollout, model=model)
    return [remote.remote(engine) for _ in range(cfg.rollout.concurrency)]


def start_judges(cfg, cpus: float) -> list:
    """``judge.engine.concurrency`` actors holding the judge's engine (its own model, never synced)."""
    import ray

    j = cfg.judge
    remote = ray.remote(RolloutActor).options(num_cpus=cpus, num_gpus=j.engine.num_gpus)
    return [remote.remote(j.engine, j.engine_factory) for _ in range(j.engine.concurrency)]


@functools.cache
def _principles(constitution: str) -> tuple:
    """The constitution's principles, read once per process (not once per iteration)."""
    return tuple(load_constitution(constitution).principles)


def starting_answers(actors: list, prompts: list[dict], cfg) -> dict[str, str]:
    """``judge.against: reference``: the starting policy's greedy answer to every prompt without a
    ``reference`` of its own, by prompt id — made once by the rollout actors (version 0) before the
    first update, and kept in the job's state so a resumed job compares with the same answers."""
    todo = [p for p in prompts if not p.get("reference")]
    if not todo:
        return {}
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    gens = rollout(actors, [p["messages"] for p in todo], params, 0)
    failed = [g for g in gens if g.error is not None]
    if failed:
        raise DataError(f"{len(failed)} of {len(gens)} reference answers of the starting policy failed, e.g. "
                        f"{failed[0].error} — check the rollout engine and max_new_tokens")
    return {p["prompt_id"]: g.text for p, g in zip(todo, gens)}


def judged(judges: list, everything: list[dict], cfg, seed: int, it: int, rank: int,
           references: dict | None = None) -> dict:
    """``reward: judge`` / ``labeler: judge``: rank 0 has the judge actors compare each prompt's
    answers with each other (``training.judging``) — or, with ``judge.against: reference``, each
    answer with its prompt's reference answer (its own, else ``references[prompt_id]``), or with
    ``against: none`` judges each answer on its own (pointwise) — and every
    rank gets each answer's ``judge_score`` (set on the samples) and the iteration's judge figures
    (``judge_s``, ``judgments``, ``judge_failed``, ``order_agreement``)."""
    import ray

    box = [None]
    if rank == 0:
        started, n = time.time(), cfg.samples_per_prompt
        if cfg.judge.against == "reference":  # answer 0 against answer 1, the reference, in each group
            groups = [[s, {"messages": s["messages"], "text": s.get("reference") or references[s["prompt_id"]]}]
                      for s in everything]
        else:
            groups = [everything[g * n:(g + 1) * n] for g in range(len(everything) // n)]
        asked = judging.requests(groups, _principles(cfg.judge.constitution), cfg.judge.principles, seed, it,
                                 pointwise=cfg.judge.against == "none")
        convs = asked.conversations
        k = -(-len(convs) // len(judges)) if convs else 0
        refs = [a.choice_logprobs.remote(convs[i * k:(i + 1) * k], list(judging.CHOICES))
                for i, a in enumerate(judges) if convs[i * k:(i + 1) * k]]
        rows = [row for part in ray.get(refs) for row in part]
        scores, figures = judging.group_scores([len(g) for g in groups], asked, rows)
        flat = [group[0] for group in scores] if cfg.judge.against == "reference" else \
            [x for group in scores for x in group]
        box[0] = (flat, {"judge_s": round(time.time() - started, 3), "judgments": figures["judgments"],
                         "judge_failed": figures["failed"], "order_agreement": figures["order_agreement"]})
    dist.broadcast_object_list(box, src=0)
    scores, figures = box[0]
    for s, x in zip(everything, scores):
        s["judge_score"] = x
    return figures


def judge_line(last: dict) -> str | None:
    """The summary's judge line (None without a judge): its throughput and share of the iteration."""
    if "judgments" not in last:
        return None
    rate = last["judgments"] / max(last["judge_s"], 1e-9)
    agree = last.get("order_agreement")
    return (f"judge: {last['judgments']} judgments in the last "
            f"iteration, {rate:.1f}/s, {100 * last['judge_s'] / max(last['seconds'], 1e-9):.0f}% of its time; "
            f"both orders agreed on {'—' if agree is None else f'{100 * agree:.0f}%'} of them, "
            f"{last['judge_failed']} left at 0.5 (no readable judgment)")


def rollout(actors: list, convs: list[list[dict]], params, version: int, group: int = 1) -> list:
    """Generations of ``convs`` spread over ``actors`` in order, whole groups of ``group``
    consecutive conversations (a prompt's samples) per actor, so each actor's random stream gives
    a prompt's samples distinct draws; all must carry ``version``."""
    import ray

    k = -(-len(convs) // group // len(actors)) * group
    refs = [a.generate.remote(convs[i * k:(i + 1) * k], params) for i, a in enumerate(actors) if convs[i * k:(i + 1) * k]]
    gens = [g for part in ray.get(refs) for g in part]
    check_policy_version(gens, version)
    return gens


def buckets(state_dict: dict, max_bytes: int) -> list[list[str]]:
    """The state dict's keys in order, cut into groups of at most ``max_bytes`` (a larger tensor
    travels alone)."""
    out, size = [[]], 0
    for k, v in state_dict.items():
        n = v.numel() * v.element_size()
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return [b for b in out if b]


def push_weights(actors: list, state_dict: dict, version: int, bucket_mb: float = 256,
                 adapter_scale: float | None = None) -> int:
    """New weights to every actor through the object store, in buckets of at most ``bucket_mb``
    (one bucket in the store at a time), then every actor loads them as ``version`` — merged into
    its starting weights first when they are LoRA adapters (``adapter_scale``: alpha / r). Returns
    the bytes sent (once, whatever the number of actors)."""
    import ray

    for keys in buckets(state_dict, int(bucket_mb * 1e6)):
        ref = ray.put({k: state_dict[k] for k in keys})
        ray.get([a.receive.remote(ref) for a in actors])
        del ref
    if adapter_scale is None:
        ray.get([a.load_weights.remote(version) for a in actors])
    else:
        ray.get([a.load_adapter.remote(version, adapter_scale) for a in actors])
    return sum(v.numel() * v.element_size() for v in state_dict.values())
