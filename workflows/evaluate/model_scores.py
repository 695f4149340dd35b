"""Model-based scores of the evaluate stage's answers, computed in Ray tasks (CPU or GPU).

A row is ``{"messages": [chat turns ending with the user turn], "answer": str}``.

- ``answer_logprobs(model, rows)`` → ``[(logp, n_tokens), ...]``: the summed log-probability of
  the answer's tokens given the prompt, rendered with the model's chat template and the
  generation prompt exactly as the engine renders it (``TransformersEngine._encode``); the
  answer tokens are ``tokenizer(answer, add_special_tokens=False)`` with no end-of-turn/EOS
  token. Caveat: a generated answer that was decoded (and perhaps stripped) may re-tokenize
  differently from the tokens the model produced. An empty answer is ``(0.0, 0)``.
- ``reward_scores(reward_dir, rows)`` → ``[float, ...]``: the run's reward model score of
  ``messages + [assistant answer]`` (``training.reward.score``, normalised as trained).
  Caveat: this is NOT an independent judge — the reward model was trained on the same run's
  AI labels, so a policy optimised against it (PPO) scores well on it by construction. Read it
  as "how much of the reward the policy captured", never as evidence of harmlessness.
- ``kl_from_base(logp_model, logp_base)``: the Monte-Carlo estimate of KL(model ‖ base) on the
  model's own answers, mean over prompts of ``log p_model(y|x) − log p_base(y|x)``, with a
  bootstrap interval over prompts. Caveat: it is unbiased only when ``y`` is *sampled* from the
  model; on greedy answers it measures the gap at the model's mode (a "how far did the policy's
  most likely answer move" number, usually larger than the true KL, and may even be < 0).
- ``run_scores([ScoreJob, ...])`` runs each job as one Ray task (``num_cpus``/``num_gpus`` per
  job) and returns the results in job order; model paths and reward heads are checked on the
  driver first, so a bad path is one ``ConfigError`` line, not a worker traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import ray
import torch

from actors.base import EngineError
from actors.models import (
    chat_prompt_ids,
    choose,
    load_causal_lm,
    load_tokenizer,
    prepare_model,
    resolve_device,
)
from training.data import pad_right
from training.reward import check_reward_dir as _check_reward_dir
from training.reward import load_reward_model, score
from workflows.core.errors import ConfigError
from workflows.stats import bootstrap_mean



def check_model(model: str) -> str:
    """The spec to load ``model`` from (a GGUF model is dequantized into the cache once, here);
    a model that cannot be found raises one ``ConfigError`` line."""
    try:
        src = prepare_model(model)
    except EngineError as e:
        raise ConfigError("evaluate", str(e)) from None
    return src.path if src.gguf_file is None else model


@torch.no_grad()
def answer_logprobs(model: str, rows: list[dict], dtype: str = "auto", batch_size: int = 8,
                    device: str = "auto") -> list[tuple[float, int]]:
    """``[(sum of the answer tokens' log-probabilities, number of answer tokens)]`` per row, in
    row order. Rows are run longest first in right-padded batches of ``batch_size``."""
    spec = check_model(model)
    dev = resolve_device(device)
    lm = load_causal_lm(spec, choose(dtype, dev, setting="evaluate.dtype").dtype, dev).eval()
    tok = load_tokenizer(spec)
    encoded = []
    for r in rows:
        answer = tok(r["answer"], add_special_tokens=False)["input_ids"] if r["answer"] else []
        encoded.append((chat_prompt_ids(tok, r["messages"]), answer))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    todo = sorted((i for i, (_, a) in enumerate(encoded) if a), key=lambda i: -sum(map(len, encoded[i])))
    for k in range(0, len(todo), max(1, batch_size)):
        chunk = todo[k:k + max(1, batch_size)]
        seqs = [encoded[i][0] + encoded[i][1] for i in chunk]
        ids, mask = pad_right(seqs, tok.pad_token_id).to(dev), pad_right([[1] * len(s) for s in seqs], 0).to(dev)
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for j, i in enumerate(chunk):
            p, a = len(encoded[i][0]), encoded[i][1]
            # Position t predicts token t + 1: the answer's tokens are predicted at p-1 .. p+len(a)-2.
            logp = torch.log_softmax(logits[j, p - 1:p - 1 + len(a)].float(), dim=-1)
            out[i] = (float(logp.gather(-1, torch.tensor(a, device=dev)[:, None]).sum()), len(a))
    return out


def reward_scores(reward_dir: str, rows: list[dict], batch_size: int = 8, dtype: str = "auto",
                  device: str = "auto") -> list[float]:
    """The reward model's score of each ``messages + [{"role": "assistant", "content": answer}]``."""
    _check_reward_dir(reward_dir, "evaluate: reward model")
    model, tok = load_reward_model(reward_dir, dtype=dtype, device=device), load_tokenizer(reward_dir)
    convs = [list(r["messages"]) + [{"role": "assistant", "content": r["answer"]}] for r in rows]
    return score(model, tok, convs, batch_size=batch_size)


def _split(xs) -> tuple[list[float], list[int] | None]:
    """Log-probabilities and token counts from floats or ``(logp, n_tokens)`` pairs."""
    if xs and all(isinstance(x, (tuple, list)) for x in xs):
        return [float(x[0]) for x in xs], [int(x[1]) for x in xs]
    return [float(x) for x in xs], None


def kl_from_base(logp_model, logp_base, n_boot: int = 2000, seed: int = 0) -> dict:
    """KL(model ‖ base) estimated on the model's answers (see the module docstring for the caveat).

    Takes per-answer log-probabilities from ``answer_logprobs`` (pairs) or plain floats, the
    same answers in the same order under both models. Returns ``{"kl", "lo", "hi", "n"}`` (nats
    per answer, 95% bootstrap interval over prompts), plus ``"kl_per_token"`` (total nats over the
    total answer tokens under the model's tokenizer) and ``"tokens"`` when counts were given."""
    m, counts = _split(logp_model)
    b, _ = _split(logp_base)
    if len(m) != len(b):
        raise ValueError(f"kl_from_base: {len(m)} answers under the model but {len(b)} under the base — "
                         "score the same answers in the same order with both")
    diffs = [x - y for x, y in zip(m, b)]
    iv = bootstrap_mean(diffs, n_boot, seed)
    out = {"kl": iv.value, "lo": iv.lo, "hi": iv.hi, "n": len(diffs)}
    if counts is not None:
        total = sum(counts)
        out.update(kl_per_token=sum(diffs) / total if total else float("nan"), tokens=total)
    return out


# ---------------------------------------------------------------- Ray

@dataclass
class ScoreJob:
    """One Ray task: ``kind`` "logprobs" (``model`` is a model spec) or "reward" (``model`` is a
    reward model directory), over ``rows``; ``kwargs`` go to the scoring function (dtype, batch_size)."""

    kind: Literal["logprobs", "reward"]
    model: str
    rows: list[dict]
    num_cpus: float = 1
    num_gpus: float = 0
    kwargs: dict = field(default_factory=dict)


def _score(kind: str, model: str, rows: list[dict], threads: int, kwargs: dict) -> list:
    torch.set_num_threads(threads)
    fn = answer_logprobs if kind == "logprobs" else reward_scores
    return fn(model, rows, **kwargs)


def run_scores(jobs: list[ScoreJob]) -> list[list]:
    """Every job as a Ray task at once; their results (``answer_logprobs`` or ``reward_scores``
    lists) in job order. Bad kinds, models and reward directories fail here, before any task."""
    specs = []
    for job in jobs:
        if job.kind not in ("logprobs", "reward"):
            raise ConfigError("evaluate: score job", f"unknown kind {job.kind!r}", "use 'logprobs' or 'reward'")
        specs.append(check_model(job.model) if job.kind == "logprobs" else _check_reward_dir(job.model, "evaluate: reward model"))
    task = ray.remote(_score)
    refs = [task.options(num_cpus=job.num_cpus, num_gpus=job.num_gpus, name=f"score-{job.kind}")
            .remote(job.kind, spec, job.rows, max(1, int(job.num_cpus)), job.kwargs)
            for job, spec in zip(jobs, specs)]
    return ray.get(refs)
