"""The per-batch programs of the ``preference`` stage (pure: any ``Engine``, no Ray) and its config.

``sample_pairs(engine, rows, cfg, seed)``: phase (a) — K samples per prompt row (one batched
``generate``), pair selection; one raw row per prompt (``pairs``/``notes`` lists, or an error).
``judge_pairs(judges, rows, cfg, constitution, seed, cache)``: phase (b) — per pair row, m
principles × both orders × every judge, each a P(A) read from ``choice_logprobs`` (CoT:
reasoning generated first), looked up in the label cache first; then ``label_pair`` →
``to_preference`` → ``preference_row``. One raw row per pair; failures are error rows.
``workflows.preference.stage`` runs both in Ray Data actor pools. With ``pairs_from`` set, phase
(a) is replaced by reading existing pairs (``workflows.preference.pairs``); with ``gold`` set,
the judges first label human-labeled gold pairs and the stage goes on only if they agree
with the humans often enough (``workflows.preference.gold``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from actors import EngineConfig, SamplingParams
from workflows.constitution import Constitution, sample_principles
from workflows.core import storage
from workflows.core.errors import RowError
from workflows.core.safety import check_recipe_code
from workflows.core.typed import check_fields
from workflows.preference.human import preference_row
from workflows.preference.judging import (
    CHOICES,
    COT_BAND,
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
    pair_id,
    principle_key,
    select_pairs,
    to_preference,
)


@dataclass
class HumanData:
    """Human preference data (``workflows.preference.human.load_human`` formats) mixed into ``preferences``."""

    path: str = ""
    ratio: float = 0.5  # fraction of the output that is human: 0 → AI rows only, 1 → human rows only
    split: str = "train"  # for saved Hugging Face dataset dirs
    limit: int | None = None


@dataclass
class RevisionData:
    """Revision pairs (``workflows.preference.revisions``) mixed into ``preferences``: chosen = the
    SL-CAI revision, rejected = the initial answer."""

    input: str = "revision_pairs"  # a revision_pairs or sl_cai dataset name of an earlier stage, or a parquet dir
    ratio: float = 0.5  # fraction of the output that is revision pairs
    p_chosen: float = 1.0  # label confidence when made here from an sl_cai dataset


@dataclass
class PreferenceConfig:
    """RL-CAI labeling: who samples, how pairs are chosen, who judges under which principles."""

    input: str = "prompts"  # dataset name of an earlier stage, or a parquet directory of prompts
    # existing pairs to label instead of sampling (then no policy runs and `input` is unused):
    # prompt/chosen/rejected, HH chosen/rejected transcripts, or prompt + response_a/response_b
    # (or response_1/response_2); jsonl/json/csv/parquet or a saved HF dataset dir
    pairs_from: str | None = None
    constitution: str = "default"
    policy: EngineConfig = field(default_factory=EngineConfig)
    samples_per_prompt: int = 2  # K
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        max_new_tokens=128, temperature=1.0, top_p=0.95, seed=0))
    max_prompt_chars: int = 8000
    pairs: Literal["all", "sample"] = "all"  # every pair of distinct samples, or pairs_per_prompt of them
    pairs_per_prompt: int | None = None
    judges: list[EngineConfig] = field(default_factory=lambda: [EngineConfig()])  # an ensemble averages judges
    principles_per_pair: int = 1  # m: the ensemble over principles
    both_orders: bool = True
    cot: bool = False
    cot_max_new_tokens: int = 128
    clamp: list[float] | None = None  # [lo, hi]; null → [0.4, 0.6] with cot, none without ([0, 1] = off)
    cache: bool = True
    cache_uri: str | None = None  # default: <run_dir>/label_cache
    human: HumanData | None = None
    revisions: RevisionData | None = None
    # the gold gate: human-labeled pairs (prompt/chosen/rejected formats of `human`) the judges
    # label first, with these same settings; below min_agreement the stage stops or warns
    gold: str | None = None  # a file, or builtin:gold_pairs (90 pairs shipped with the evaluate stage)
    min_agreement: float = 0.6  # share of gold pairs where the AI picks the human's answer
    max_position_bias: float | None = 0.4  # share of gold pairs whose two orders disagree (null: no limit)
    on_gold_fail: Literal["stop", "warn"] = "stop"
    checkpoint_rows: int = 256  # rows per raw file: the unit of work a resumed run does not redo
    engine_factory: str | None = None  # "module:callable" building every engine (tests, benchmarks)

    @property
    def band(self) -> tuple[float, float] | None:
        if self.clamp is not None:
            return (float(self.clamp[0]), float(self.clamp[1]))
        return COT_BAND if self.cot else None

    def validate(self, where: str) -> None:
        c, h = self.clamp, self.human
        checks = [
            ("samples_per_prompt", self.samples_per_prompt < 2, "use 2 or more: a pair needs two responses"),
            ("sampling.temperature", self.sampling.temperature <= 0,
             "sample with temperature > 0 (e.g. 1.0): greedy decoding gives K identical responses"),
            ("sampling.max_new_tokens", self.sampling.max_new_tokens < 1, "use 1 or more"),
            ("pairs_per_prompt", self.pairs == "sample" and (self.pairs_per_prompt or 0) < 1,
             "with pairs: sample, set pairs_per_prompt to 1 or more"),
            ("judges", not self.judges, "list at least one judge engine, e.g. judges: [{model: embedded}]"),
            ("principles_per_pair", self.principles_per_pair < 1, "use 1 or more"),
            ("cot_max_new_tokens", self.cot_max_new_tokens < 1, "use 1 or more"),
            ("clamp", c is not None and not (len(c) == 2 and 0.0 <= c[0] <= c[1] <= 1.0),
             "write [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0.4, 0.6], or null"),
            ("cache_uri", self.cache_uri is not None and not self.cache_uri.strip(), "remove it or give a path"),
            ("human.path", h is not None and not h.path.strip(), "point it at a jsonl/csv/parquet/HF dataset dir"),
            ("human.ratio", h is not None and not 0.0 <= h.ratio <= 1.0, "use a fraction between 0 and 1"),
            ("revisions.ratio", self.revisions is not None and not 0.0 <= self.revisions.ratio <= 1.0,
             "use a fraction between 0 and 1"),
            ("revisions.ratio", self.revisions is not None and h is not None and h.ratio + self.revisions.ratio > 1.0,
             "human.ratio + revisions.ratio is the given share of the output: make them add up to at most 1"),
            ("revisions.p_chosen", self.revisions is not None and not 0.5 < self.revisions.p_chosen <= 1.0,
             "use a confidence above 0.5 and at most 1.0"),
            ("pairs_from", _missing_file(self.pairs_from),
             "no such file: point it at a jsonl/json/csv/parquet file or saved Hugging Face dataset dir of pairs"),
            ("gold", _missing_file(self.gold),
             "no such file: point it at a jsonl/json/csv/parquet file or saved Hugging Face dataset dir of "
             "human-labeled pairs (prompt, chosen, rejected)"),
            ("min_agreement", not 0.0 <= self.min_agreement <= 1.0, "use a share between 0 and 1, e.g. 0.6"),
            ("max_position_bias", self.max_position_bias is not None and not 0.0 <= self.max_position_bias <= 1.0,
             "use a share between 0 and 1, e.g. 0.4, or null"),
            ("checkpoint_rows", self.checkpoint_rows < 1, "use 1 or more"),
        ]
        check_fields(self, where, checks)
        check_recipe_code(self.engine_factory, where)


def _missing_file(path: str | None) -> bool:
    """True for an empty path or a local one that does not exist. Remote (s3://) paths are
    checked when the stage reads them (validation needs no network)."""
    if path is None:
        return False
    if path.startswith("builtin:"):
        from workflows.evaluate.config import DATA

        return not (DATA / f"{path.split(':', 1)[1]}.jsonl").is_file()
    return not path.strip() or (not storage.is_remote(path) and not os.path.exists(path))


def judge_id(cfg: EngineConfig) -> str:
    """A judge's identity in cache keys: backend and model (plus tokenizer / endpoint when set).
    Weights overwritten in place keep the id: use another cache_uri then."""
    parts = [cfg.backend, cfg.model] + ([f"tokenizer={cfg.tokenizer}"] if cfg.tokenizer else [])
    return ":".join(parts + ([cfg.openai.base_url] if cfg.backend == "openai" else []))


def _fail_reason(error: str) -> str:
    return error.split(":", 1)[0].strip() or "generation_failed"


# ---------------------------------------------------------------- (a) sampling

def _prompt_problem(msgs: list[dict], max_chars: int) -> tuple[str, str] | None:
    last = msgs[-1] if msgs else None
    if not last or last.get("role") != "user" or not (last.get("content") or "").strip():
        return ("empty_prompt", "the prompt has no non-empty final user turn")
    if sum(len(m.get("content") or "") for m in msgs) > max_chars:
        return ("prompt_too_long", f"over max_prompt_chars={max_chars}")
    return None


def sample_pairs(engine, rows: list[dict], cfg: PreferenceConfig, seed: int) -> list[dict]:
    """Phase (a) on a batch of prompt rows: K samples each in one ``generate`` call, then pair
    selection. One raw row per prompt, in order; a prompt without a pair is an error row."""
    k = cfg.samples_per_prompt
    out = [{"prompt_id": r["prompt_id"], "messages": r.get("messages") or [], "source": r.get("source"),
            "pairs": [], "notes": [], "_error": None, "_detail": None, "_samples": k, "_failed_samples": 0,
            "_duplicate_groups": 0, "_pairs": 0, "_policy_calls": 0, "_gen_tokens": 0, "_prompt_tokens": 0}
           for r in rows]
    live = []
    for i, raw in enumerate(out):
        problem = _prompt_problem(raw["messages"], cfg.max_prompt_chars)
        raw["_error"], raw["_detail"] = problem or (None, None)
        if problem is None:
            live.append(i)
    convs = [out[i]["messages"] for i in live for _ in range(k)]
    gens = engine.generate(convs, cfg.sampling) if convs else []
    for n, i in enumerate(live):
        _select(out[i], gens[n * k:(n + 1) * k], cfg, seed)
    return out


def _select(raw: dict, gens: list, cfg: PreferenceConfig, seed: int) -> None:
    pid, texts, failed = raw["prompt_id"], [], []
    raw["_policy_calls"] = len(gens)
    for s, g in enumerate(gens):
        raw["_gen_tokens"] += g.completion_tokens
        raw["_prompt_tokens"] += g.prompt_tokens
        text = g.text.strip() if g.error is None else ""
        if text:
            texts.append(text)
        else:
            failed.append({"id": f"{pid}/sample-{s}", "reason": _fail_reason(g.error) if g.error else "empty_generation",
                           "detail": g.error or "the model returned no text"})
    sel = select_pairs(texts, cfg.pairs, cfg.pairs_per_prompt, seed, key=pid)
    raw["_failed_samples"], raw["_duplicate_groups"] = len(failed), len(sel.duplicates)
    if not sel.pairs:
        if len(texts) >= 2:
            raw["_error"], raw["_detail"] = "duplicate_responses", f"all {len(texts)} good samples are the same text"
        elif not texts:
            raw["_error"], raw["_detail"] = failed[0]["reason"], f"all {len(gens)} samples failed; {failed[0]['detail']}"
        else:
            raw["_error"] = "too_few_responses"
            raw["_detail"] = f"1 of {len(gens)} samples succeeded; first failure: {failed[0]['detail']}"
        return
    raw["pairs"] = [{"pair_id": pair_id(pid, texts[i], texts[j]), "response_a": texts[i], "response_b": texts[j]}
                    for i, j in sel.pairs]
    raw["notes"] = failed + [{"id": pair_id(pid, texts[g[0]], texts[g[0]]), "reason": "duplicate_responses",
                              "detail": f"{len(g)} samples are the same text; paired once"} for g in sel.duplicates]
    raw["_pairs"] = len(raw["pairs"])


# ---------------------------------------------------------------- (b) judging

def template_version(cfg: PreferenceConfig) -> str:
    return JUDGE_TEMPLATE_VERSION + (f"+cot{cfg.cot_max_new_tokens}" if cfg.cot else "")


def judge_pairs(judges: list, rows: list[dict], cfg: PreferenceConfig, constitution: Constitution, seed: int,
                cache=None) -> list[dict]:
    """Phase (b) on a batch of pair rows; one raw row per pair, in order. ``judges``: engines or
    (engine, cache id) tuples. Judgments found in ``cache`` (``get``/``put_many``) cost nothing;
    the misses go to each judge in one batched call (CoT: ``generate`` then ``choice_logprobs``)."""
    judges = [j if isinstance(j, tuple) else (j, j.name) for j in judges]
    orders = (0, 1) if cfg.both_orders else (0,)
    tmpl, n = template_version(cfg), len(rows)
    hits, misses, calls = [0] * n, [0] * n, [0] * n
    plans, want, got, owner = [], {}, {}, {}
    for i, r in enumerate(rows):
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
                    if k in got or k in want:
                        continue
                    hit = cache.get(k) if cache is not None else None
                    if hit is not None:
                        got[k], hits[i] = hit["p_a"], hits[i] + 1
                    else:
                        want[k], owner[k], misses[i] = (j, msgs, x, y, p), i, misses[i] + 1
        plans.append((pids, keys))
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
                    got[k] = RowError(_fail_reason(g.error), f"chain of thought: {g.error}")
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
