"""Answering held-out prompts (pure: any ``Engine``, no Ray).

Every model answers the same prompt rows with the same conversation, decoding settings and
seed; the engine applies the model's own chat template (models trained by this project keep
their base model's tokenizer and template). One raw row per prompt: its ``answers`` (one per
sample) or an error naming why generation failed. An empty answer is a valid answer (the
refusal classifier counts it as a refusal: it gives the user nothing).
"""
from __future__ import annotations

from actors import SamplingParams
from workflows.core.errors import RowError


def unit_id(eval_id: str, sample: int) -> str:
    """One answer slot: a prompt of a set and a sample index (``<set>/<prompt_id>#<k>``)."""
    return f"{eval_id}#{sample}"


def answer_batch(engine, rows: list[dict], sampling: SamplingParams, k: int = 1) -> list[dict]:
    """``k`` answers per prompt row in one batched ``generate``; one raw row per prompt, in order."""
    out, live = [], []
    for r in rows:
        msgs = r.get("messages") or []
        err = None
        if not msgs or msgs[-1].get("role") != "user" or not (msgs[-1].get("content") or "").strip():
            err = RowError("empty_prompt", "the prompt has no non-empty final user turn")
        out.append({"eval_id": r["eval_id"], "answers": [], "_error": err and err.reason, "_detail": err and err.detail,
                    "_gen_tokens": 0, "_prompt_tokens": 0})
        if err is None:
            live.append((len(out) - 1, msgs))
    gens = engine.generate([m for _, m in live for _ in range(k)], sampling) if live else []
    for n, (i, _) in enumerate(live):
        mine = gens[n * k:(n + 1) * k]
        failed = next((g for g in mine if g.error is not None), None)
        if failed is not None:
            reason = failed.error.split(":", 1)[0].strip() or "generation_failed"
            out[i]["_error"], out[i]["_detail"] = reason, failed.error
            continue
        out[i]["answers"] = [g.text.strip() for g in mine]
        out[i]["_gen_tokens"] = sum(g.completion_tokens for g in mine)
        out[i]["_prompt_tokens"] = sum(g.prompt_tokens for g in mine)
    return out
