"""Prompt templates of the SL-CAI loop (pure functions; no models, no Ray).

The conversation for a critique is the constitution's few-shot examples, then the user's
prompt, the current answer, and the principle's critique request. The revision extends it
with the critique and the principle's revision request — the format of Bai et al. (2022).
"""
from __future__ import annotations

import re

TEMPLATE_VERSION = "sl-cai/1"

_LABEL = re.compile(r"^\s*(?:\*\*)?(critique|revision|revised response|rewrite|response)\s*(?:\*\*)?\s*:\s*",
                    re.IGNORECASE)


def few_shot_messages(few_shot, n: int) -> list[dict]:
    """The first ``n`` example conversations, flattened into one message list."""
    out: list[dict] = []
    for conv in list(few_shot)[:max(0, n)]:
        out.extend({"role": m["role"], "content": m["content"]} for m in conv if m["role"] != "system")
    return out


def _with_context(prompt: list[dict], examples: list[dict]) -> list[dict]:
    """System turns first (chat templates expect them there), then examples, then the prompt."""
    system = [dict(m) for m in prompt if m["role"] == "system"]
    rest = [dict(m) for m in prompt if m["role"] != "system"]
    return [*system, *examples, *rest]


def initial_conversation(prompt: list[dict]) -> list[dict]:
    return [dict(m) for m in prompt]


def critique_conversation(prompt: list[dict], response: str, critique_request: str,
                          examples: list[dict] | None = None) -> list[dict]:
    return [*_with_context(prompt, examples or []), {"role": "assistant", "content": response},
            {"role": "user", "content": critique_request}]


def revision_conversation(critique_conv: list[dict], critique: str, revision_request: str) -> list[dict]:
    return [*critique_conv, {"role": "assistant", "content": critique},
            {"role": "user", "content": revision_request}]


def clean_generation(text: str) -> str:
    """Strip a leading ``Critique:``/``Revision:`` label that models like to echo."""
    return _LABEL.sub("", text.strip(), count=1).strip()


def sft_messages(prompt: list[dict], final_response: str) -> list[dict]:
    """TRL conversational format: the prompt turns plus the final assistant turn."""
    return [*({"role": m["role"], "content": m["content"]} for m in prompt),
            {"role": "assistant", "content": final_response}]
