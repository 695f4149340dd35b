"""The per-batch judging program (pure: any ``Engine``, no Ray).

``judge_pairs(judges, rows, cfg, constitution, seed, cache)``: per pair row, m principles ×
both orders × every judge, each a P(A) read from ``choice_logprobs`` (CoT: reasoning
generated first), looked up in the label cache first; then ``label_pair`` →
``to_preference`` → ``preference_row``. One raw row per pair; failures are error rows.
``judging.workers.JudgeWorker`` runs it in a Ray Data actor pool, for the ``preference``
stage's pairs and for gold pairs (``judging.gold``).
"""
from __future__ import annotations

from actors import SamplingParams
from workflows.core.constitution import Constitution, sample_principles
from workflows.core.errors import RowError
from workflows.judging.config import PreferenceConfig
from workflows.judging.human import preference_row
from workflows.core.pairwise import (
    CHOICES,
    JUDGE_TEMPLATE_VERSION,
    cache_key,
    clamp,
    cot_conversation,
    degenerate,
    ensemble,
    judge_conversation,
    label_pair,
    order_average,
    p_a,
    principle_key,
    to_preference,
)


def fail_reason(error: str) -> str:
    return error.split(":", 1)[0].strip() or "generation_failed"



def template_version(cfg: PreferenceConfig) -> str:
    return JUDGE_TEMPLATE_VERSION + (f"+cot{cfg.cot_max_new_tokens}" if cfg.cot else "")


def judge_pairs(judges: list, rows: list[dict], cfg: PreferenceConfig, constitution: Constitution, seed: int,
                cache=None) -> list[dict]:
    """Phase (b) on a batch of pair rows; one raw row per pair, in order. ``judges``: engines or
    (engine, cache id) tuples. Judgments found in ``cache`` (one ``get_many`` for the whole batch,
    then ``put_many``) cost nothing; the misses go to each judge in one batched call (CoT:
    ``generate`` then ``choice_logprobs``)."""
    judges = [j if isinstance(j, tuple) else (j, j.name) for j in judges]
    orders = (0, 1) if cfg.both_orders else (0,)
    tmpl, n = template_version(cfg), len(rows)
    hits, misses, calls = [0] * n, [0] * n, [0] * n
    plans, asks, want, got, owner = [], {}, {}, {}, {}
    for r in rows:
        a, b, msgs = r.get("response_a") or "", r.get("response_b") or "", r.get("messages") or []
        if not (a.strip() and b.strip() and msgs):
            plans.append(RowError("bad_pair", "empty response or prompt"))
            continue
        pids = sample_principles(constitution, r["pair_id"], cfg.principles_per_pair, seed)
        keys = {}
        for j, (_, jid) in enumerate(judges):
            for s, p in enumerate(constitution.get(x) for x in pids):
                for o in orders:
                    x, y = (a, b) if o == 0 else (b, a)
                    k = keys[(j, s, o)] = cache_key(msgs, x, y, principle_key(p), jid, tmpl, cfg.cot)
                    asks.setdefault(k, (j, msgs, x, y, p))
        plans.append((pids, keys))
    cached = cache.get_many(list(asks)) if cache is not None and asks else {}
    for i, plan in enumerate(plans):
        for k in () if isinstance(plan, RowError) else plan[1].values():
            if k in got or k in want:
                continue
            hit = cached.get(k)
            if hit is not None:
                got[k], hits[i] = hit["p_a"], hits[i] + 1
            else:
                want[k], owner[k], misses[i] = asks[k], i, misses[i] + 1
    sent = _ask_judges(judges, want, got, cfg, cache)
    for k, c in sent.items():
        calls[owner[k]] += c
    name = "+".join(e.name for e, _ in judges)
    out = []
    for i, (r, plan) in enumerate(zip(rows, plans)):
        metrics = {"_judgments": 0 if isinstance(plan, RowError) else len(plan[1]), "_cache_hits": hits[i],
                   "_cache_misses": misses[i], "_judge_calls": calls[i]}
        try:
            if isinstance(plan, RowError):
                raise plan
            out.append({**_label_row(r, plan[0], {t: got[k] for t, k in plan[1].items()}, len(judges), name, cfg),
                        "_error": None, "_detail": None, **metrics})
        except RowError as e:
            out.append({"pair_id": r["pair_id"], "prompt_id": r.get("prompt_id"), "_error": e.reason,
                        "_detail": e.detail, **metrics})
    return out


def _ask_judges(judges, want: dict, got: dict, cfg: PreferenceConfig, cache) -> dict[str, int]:
    """Fill ``got[key]`` (P(A) or RowError) for every key in ``want``; cache the good ones.
    Returns conversations sent per key."""
    new, sent = {}, {k: 0 for k in want}
    for j, (engine, _) in enumerate(judges):
        ks, reasons = [k for k, w in want.items() if w[0] == j], {}
        if cfg.cot and ks:
            gens = engine.generate([cot_conversation(*want[k][1:]) for k in ks],
                                   SamplingParams(max_new_tokens=cfg.cot_max_new_tokens))
            for k, g in zip(ks, gens):
                sent[k] += 1
                if g.error is not None:
                    got[k] = RowError(fail_reason(g.error), f"chain of thought: {g.error}")
                elif not g.text.strip():
                    got[k] = RowError("empty_reasoning", "the chain-of-thought generation is empty")
                else:
                    reasons[k] = g.text.strip()
            ks = list(reasons)
        convs = [judge_conversation(*want[k][1:], cot=cfg.cot, reasoning=reasons.get(k)) for k in ks]
        for k, row in zip(ks, engine.choice_logprobs(convs, list(CHOICES)) if convs else []):
            sent[k] += 1
            try:
                got[k] = p_a(row)
                new[k] = {"p_a": got[k], "logp_a": row[0], "logp_b": row[1], "reasoning": reasons.get(k)}
            except RowError as e:
                got[k] = e
    if cache is not None and new:
        cache.put_many(new)
    return sent


def _label_row(r: dict, pids: list[str], vals: dict, n_judges: int, judge: str, cfg: PreferenceConfig) -> dict:
    """One pair's ``preferences`` row (+ per-principle detail) from its P(A) values, keyed
    (judge, principle slot, order). Judges and principles are averaged with equal weight."""
    bad = next((v for v in vals.values() if isinstance(v, RowError)), None)
    if bad is not None:
        raise bad
    J, S = range(n_judges), range(len(pids))
    first = [vals[(j, s, 0)] for j in J for s in S]
    if cfg.both_orders:
        p1, agree = label_pair(first, [vals[(j, s, 1)] for j in J for s in S], cfg.band)
    else:
        if degenerate(first):
            raise RowError("degenerate_judgment", f"P(A) = 0.5 for all {len(first)} judgment(s) (judge gives no signal)")
        p1, agree = (clamp(ensemble(first), *cfg.band) if cfg.band else ensemble(first)), None
    per_p, per_agree = [], []
    for s in S:
        fa = ensemble([vals[(j, s, 0)] for j in J])
        p, ag = order_average(fa, ensemble([vals[(j, s, 1)] for j in J])) if cfg.both_orders else (fa, None)
        per_p.append(p)
        per_agree.append(ag)
    first_better, p_chosen = to_preference(p1)
    a, b = r["response_a"], r["response_b"]
    row = preference_row(r["messages"], a if first_better else b, b if first_better else a, p_chosen,
                         principle_ids=pids, judge=judge, order_agreement=agree, source="ai")
    return {**row, "pair_id": r["pair_id"], "prompt_id": r["prompt_id"], "principle_agree": per_agree,
            "principle_p_chosen": [p if first_better else 1.0 - p for p in per_p]}
