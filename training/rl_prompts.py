"""The prompts of the RL jobs (ppo, grpo, online_dpo): read from a prompts (or SFT) dataset,
drawn by every source in proportion, and kept only where an answer fits the rollout engine."""
from __future__ import annotations

from actors.models import chat_prompt_ids, load_tokenizer
from training.config import PPOConfig
from workflows.core import storage
from workflows.core.errors import DataError


def read_prompts(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    try:
        names = set(pq.ParquetDataset(path, filesystem=fs).schema.names)
        columns = ["prompt_id", "messages"] + (["source"] if "source" in names else [])
        rows = pq.read_table(path, columns=columns, filesystem=fs).to_pylist()
    except Exception as e:  # noqa: BLE001 — any unreadable input is one clear line
        raise DataError(f"{uri}: cannot read prompt_id and messages ({type(e).__name__}: {e}) — point `input` at "
                        "the prompts dataset of an earlier stage") from None
    out = []
    for r in rows:  # an SFT-style row ends with the answer: the prompt is everything before it
        msgs, reference = list(r["messages"] or []), None
        if msgs and msgs[-1]["role"] == "assistant":  # kept as the judge's reference (judge.against: reference)
            msgs, reference = msgs[:-1], msgs[-1]["content"]
        if msgs:
            out.append({"prompt_id": r["prompt_id"], "messages": msgs, "source": r.get("source"),
                        "reference": reference})
    return out


def interleave_sources(prompts: list[dict]) -> list[dict]:
    """The prompts in the order iterations draw them: each source's rows spread evenly through the
    list, in proportion (a dataset read source after source — 205 red-team rows, then 150 helpful
    — would otherwise give the first iterations only red-team prompts). One source: unchanged."""
    count: dict = {}
    for p in prompts:
        count[p.get("source")] = count.get(p.get("source"), 0) + 1
    seen: dict = {}
    keyed = []
    for i, p in enumerate(prompts):
        src = p.get("source")
        k = seen.get(src, 0)
        seen[src] = k + 1
        keyed.append(((k + 0.5) / count[src], str(src), i, p))
    return [p for *_, p in sorted(keyed, key=lambda x: x[:3])]


def fitting_prompts(prompts: list[dict], model: str, cfg: PPOConfig) -> tuple[list[dict], list[str]]:
    """(prompts whose chat-templated tokens leave room for ``max_new_tokens`` in the rollout
    engine's ``max_model_len``, ids of the others)."""
    limit = (cfg.rollout.backend == "vllm" and cfg.rollout.vllm.max_model_len) or cfg.rollout.max_model_len
    tok, room = load_tokenizer(model), limit - cfg.max_new_tokens
    keep, drop = [], []
    for p in prompts:
        (keep if len(chat_prompt_ids(tok, p["messages"])) <= room else drop).append(p)
    return keep, [p["prompt_id"] for p in drop]
