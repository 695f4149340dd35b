"""The per-batch sampling program of the ``preference`` stage (pure: any ``Engine``, no Ray).

``sample_pairs(engine, rows, cfg, seed)``: phase (a) — K samples per prompt row (one batched
``generate``), pair selection; one raw row per prompt (``pairs``/``notes`` lists, or an error).
``workflows.preference.stage`` runs it in a Ray Data actor pool; phase (b), judging the pairs,
is ``workflows.judging.batch.judge_pairs``. With ``pairs_from`` set, phase (a) is replaced by
reading existing pairs (``workflows.judging.pairs``); with ``gold`` set, the judges first label
human-labeled gold pairs and the stage goes on only if they agree with the humans often
enough (``workflows.judging.gold``).
"""
from __future__ import annotations

from workflows.judging.batch import fail_reason
from workflows.judging.config import PreferenceConfig
from workflows.core.pairwise import pair_id, select_pairs


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
            failed.append({"id": f"{pid}/sample-{s}", "reason": fail_reason(g.error) if g.error else "empty_generation",
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
