"""The engine protocol every backend implements (docs/engines.md).

A stage never knows which backend it runs on: it builds chat conversations
(lists of ``{"role", "content"}`` dicts), calls ``generate`` or
``choice_logprobs`` on a whole batch, and reads plain results back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from actors.config import raise_first

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Conversation = list  # list[Message]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # >1 discourages repeats (CTRL-style); small models loop without it

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self, where: str) -> None:
        raise_first([
            ("max_new_tokens", self.max_new_tokens < 1, "use 1 or more tokens"),
            ("temperature", self.temperature < 0, "use 0 (greedy) or a positive temperature, e.g. 0.7"),
            ("top_p", not 0 < self.top_p <= 1, "use a probability in (0, 1], e.g. 0.9"),
            ("repetition_penalty", self.repetition_penalty <= 0, "use 1.0 (none) or a little above, e.g. 1.1"),
        ], where, self)


@dataclass
class Generation:
    """One completion. ``error`` is set (and ``text`` empty) when this row failed;
    a failed row never fails the batch it came in."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS or stop string) | "length" | "error"
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str) -> "Generation":
        return cls(text="", finish_reason="error", error=reason)


class EngineError(RuntimeError):
    """An engine could not be built or used at all (bad model path, missing extra, ...).
    The message says what was wrong and how to fix it."""


@runtime_checkable
class Engine(Protocol):
    """What every backend offers. Both methods take a whole batch."""

    name: str

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[Generation]:
        """One completion of the assistant turn per conversation, in input order."""
        ...

    def choice_logprobs(self, conversations: list[Conversation], choices: list[str]) -> list[list[float]]:
        """For each conversation, log P(choice) of each choice as the *next* token(s) of
        the assistant turn, in ``choices`` order (one prefill, no sampling)."""
        ...


def describe(engine) -> dict:
    """What an engine runs as — name, device, number format and why, why this backend, seconds
    to load — for logs and stage summaries. Engines without a local model (an HTTP endpoint)
    have no device, dtype or load time."""
    p = getattr(engine, "precision", None)
    info = {"engine": str(getattr(engine, "name", type(engine).__name__)),
            "device": str(getattr(engine, "device", "") or ""),
            "dtype": str(getattr(p, "name", "") or ""), "dtype_reason": str(getattr(p, "reason", "") or ""),
            "backend_reason": str(getattr(engine, "backend_reason", "") or "")}
    if getattr(engine, "load_s", None) is not None:
        info["load_s"] = float(engine.load_s)
    return info


def check_policy_version(generations: list[Generation], version: int) -> None:
    """RL rollouts must come from the weights being trained: a generation tagged with another
    ``policy_version`` (an engine that missed an update) raises ``EngineError`` — never used."""
    stale = sorted({g.extra.get("policy_version") for g in generations if g.error is None} - {version}, key=str)
    if stale:
        raise EngineError(f"stale rollout: generated with policy version(s) {stale}, the trainer is at {version} — "
                          "every rollout engine must load the new weights before generating")
