"""Scripted engines for fast, exact tests of stage logic (no model, no Ray)."""
from __future__ import annotations

from actors.base import Generation


class ScriptedEngine:
    """Answers by rule so tests can check exactly what the stage sent:
    - a conversation whose last user turn contains ``FAIL`` fails with ``fail_reason``;
    - the initial answer echoes the prompt, a critique/revision names the request it answers."""

    name = "scripted"

    def __init__(self, fail_reason: str = "boom: scripted failure", empty_on: str | None = None):
        self.calls: list[list[list[dict]]] = []
        self.fail_reason, self.empty_on = fail_reason, empty_on

    def generate(self, conversations, params):
        self.calls.append(conversations)
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            if "FAIL" in last:
                out.append(Generation.failed(self.fail_reason))
            elif self.empty_on and self.empty_on in last:
                out.append(Generation(text="   ", completion_tokens=1))
            else:
                n_assist = sum(m["role"] == "assistant" for m in conv)
                out.append(Generation(text=f"reply#{n_assist} to [{last[:40]}]", prompt_tokens=len(conv),
                                      completion_tokens=5))
        return out

    def choice_logprobs(self, conversations, choices):
        return [[-0.5] * len(choices) for _ in conversations]


def fail_batches_holding(engine, n_tokens: int, monkeypatch) -> None:
    """Make ``engine.model.generate`` raise ``RuntimeError("boom")`` on any batch holding a row
    of ``n_tokens`` prompt tokens (count them with ``engine.count_tokens``); others run normally."""
    real = engine.model.generate

    def flaky(input_ids, attention_mask, **kw):
        if bool((attention_mask.sum(-1) == n_tokens).any()):
            raise RuntimeError("boom")
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(engine.model, "generate", flaky)
