"""RL-CAI preference labeling: the pure logic (no models, no Ray).

The feedback model sees the conversation, a principle's ``comparison`` question and two
candidate answers as multiple-choice options ``(A)``/``(B)`` — the format of Bai et al.
(2022), §4. Its answer is read from log-probabilities, not parsed from text:

1. ``judge_conversation(prompt, r1, r2, principle)`` ends with the user turn; the engine
   applies the chat template and ``engine.choice_logprobs(convs, list(CHOICES))`` reads
   log P("A"), log P("B") as the assistant's first token. ``CHOICES == ("A", "B")``.
2. Every (pair, principle) is asked in both orders (``both_orders``): r1 as (A), then r1
   as (B). ``p_a(row)`` turns one engine row into P(A) among the two letters.
3. ``label_pair`` order-averages each principle, ensembles over principles, optionally
   clamps to a band (the paper clamps CoT labels to 0.4–0.6) and flags degenerate judges.
   ``to_preference`` maps the result to (chosen, p_chosen ≥ 0.5).

Chain of thought: generate reasoning for ``cot_conversation(...)``, then score
``judge_conversation(..., cot=True, reasoning=text)`` with ``choice_logprobs``.

Ids: ``pair_id`` names an unordered pair of responses to one prompt; ``cache_key`` names
one judgment (ordered, per principle, judge, template and mode) for the label cache.
Row failures raise ``RowError`` with reasons ``unparseable_judgment``,
``degenerate_judgment`` or ``empty_reasoning``; ``select_pairs`` reports identical
responses so the stage can record ``duplicate_responses``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import unicodedata
from typing import Literal, NamedTuple

from workflows.core.errors import RowError
from workflows.core.ids import ID_HEX

JUDGE_TEMPLATE_VERSION = "rl-cai-judge/1"
CHOICES = ("A", "B")
COT_BAND = (0.4, 0.6)           # the CAI paper's clamp for chain-of-thought labels
DEGENERATE_TOL = 1e-6

_INTRO = "Consider the following conversation between a human and an assistant:"
_ANSWER = "Answer with the letter of the better option: A or B."
_THINK = "First explain your reasoning, then say which option is better. Let's think step by step."
_FOLLOW_UP = "So the answer is: (A) or (B)? Answer with the letter."
_ALONE = "Judge the assistant's last response on its own, by the standard of that question."
_VERDICTS = ("The response meets that standard.", "The response falls short of that standard.")
_TRUE = "Answer with the letter of the true option: A or B."
_SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ---------------------------------------------------------------- prompts

def render_conversation(messages: list[dict]) -> str:
    """Messages → ``"Human: ...\\n\\nAssistant: ..."`` (system turns as ``System:``)."""
    return "\n\n".join(f"{_SPEAKERS.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in messages)


def _question(principle) -> str:
    """A ``Principle``'s ``comparison`` question, or the question itself when given a string."""
    text = principle if isinstance(principle, str) else principle.comparison
    if not text or not text.strip():
        raise ValueError("the principle's comparison question is empty")
    return text.strip()


def _body(prompt_messages: list[dict], response_a: str, response_b: str, principle, ending: str) -> str:
    if not prompt_messages:
        raise ValueError("prompt_messages is empty: a judged conversation needs at least one user turn")
    return (f"{_INTRO}\n\n{render_conversation(prompt_messages)}\n\n{_question(principle)}\n\n"
            f"Options:\n(A) {response_a.strip()}\n(B) {response_b.strip()}\n\n{ending}")


def cot_conversation(prompt_messages: list[dict], response_a: str, response_b: str, principle) -> list[dict]:
    """The chain-of-thought question (one user turn) to *generate* reasoning for."""
    return [{"role": "user", "content": _body(prompt_messages, response_a, response_b, principle, _THINK)}]


def judge_conversation(prompt_messages: list[dict], response_a: str, response_b: str, principle,
                       cot: bool = False, reasoning: str | None = None) -> list[dict]:
    """The conversation to score with ``engine.choice_logprobs(convs, ["A", "B"])``.

    It always ends with a user turn, so the assistant's reply starts with the letter.
    ``principle`` is a ``Principle`` (its ``comparison`` is asked) or the question text.
    Direct mode: one user turn (conversation, question, ``Options:\\n(A) ...\\n(B) ...``,
    "answer with the letter"). CoT mode (``cot=True``): ``cot_conversation(...)``, then the
    model's ``reasoning`` as an assistant turn, then "So the answer is: (A) or (B)?".
    An empty ``reasoning`` raises ``RowError("empty_reasoning")``.
    """
    if not cot:
        if reasoning is not None:
            raise ValueError("reasoning is only used with cot=True")
        return [{"role": "user", "content": _body(prompt_messages, response_a, response_b, principle, _ANSWER)}]
    if reasoning is None or not reasoning.strip():
        raise RowError("empty_reasoning", "the chain-of-thought generation is empty")
    return [*cot_conversation(prompt_messages, response_a, response_b, principle),
            {"role": "assistant", "content": reasoning.strip()},
            {"role": "user", "content": _FOLLOW_UP}]


def both_orders(prompt_messages: list[dict], response_1: str, response_2: str, principle,
                cot: bool = False, reasonings: tuple[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """(response_1 as (A), response_1 as (B)) — the two conversations scored per principle.
    In CoT mode ``reasonings`` holds the reasoning generated for each order."""
    r = reasonings or (None, None)
    return (judge_conversation(prompt_messages, response_1, response_2, principle, cot, r[0]),
            judge_conversation(prompt_messages, response_2, response_1, principle, cot, r[1]))


def pointwise_conversation(prompt_messages: list[dict], response: str, principle,
                           meets_first: bool = True) -> list[dict]:
    """One answer judged on its own (a pointwise judgment): the conversation ending in
    ``response``, the principle's question, and the options "meets that standard" / "falls
    short" — as (A) then (B) with ``meets_first``, swapped without. Scored like a pair: log P("A"),
    log P("B")."""
    if not prompt_messages:
        raise ValueError("prompt_messages is empty: a judged conversation needs at least one user turn")
    a, b = _VERDICTS if meets_first else _VERDICTS[::-1]
    convo = render_conversation([*prompt_messages, {"role": "assistant", "content": response.strip()}])
    return [{"role": "user", "content": f"{_INTRO}\n\n{convo}\n\n{_question(principle)}\n{_ALONE}\n\n"
                                        f"Options:\n(A) {a}\n(B) {b}\n\n{_TRUE}"}]


def both_verdict_orders(prompt_messages: list[dict], response: str, principle) -> tuple[list[dict], list[dict]]:
    """("meets" as (A), "meets" as (B)): ``order_average`` of their ``p_a`` is P(the response meets
    the principle), the letter bias cancelled as ``both_orders`` cancels it for a pair."""
    return (pointwise_conversation(prompt_messages, response, principle, True),
            pointwise_conversation(prompt_messages, response, principle, False))


# ---------------------------------------------------------------- soft labels

def normalize_pair(logp_a: float, logp_b: float) -> float:
    """P(A) among the two letters: softmax over (log P(A), log P(B)).

    One side ``-inf`` gives exactly 0 or 1. NaN (an engine error row), ``+inf``, or both
    ``-inf`` raise ``RowError("unparseable_judgment")``."""
    la, lb = float(logp_a), float(logp_b)
    if math.isnan(la) or math.isnan(lb) or math.inf in (la, lb) or la == lb == -math.inf:
        raise RowError("unparseable_judgment", f"log P(A)={la}, log P(B)={lb}")
    d = lb - la
    return 1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0


def p_a(row: list[float]) -> float:
    """One ``choice_logprobs`` row for ``["A", "B"]`` → P(A) (``RowError`` on NaN rows)."""
    if len(row) != 2:
        raise RowError("unparseable_judgment", f"expected log-probs for A and B, got {len(row)} values")
    return normalize_pair(row[0], row[1])


def order_average(p_a_first: float, p_a_second_swapped: float) -> tuple[float, bool]:
    """(P(response 1 is better), order_agreement) from both orders.

    ``p_a_first`` is P(A) with response 1 as option A; ``p_a_second_swapped`` is P(A) with
    the responses swapped (response 1 as option B). p = (p_a_first + 1 - p_a_swapped) / 2.
    order_agreement: both orders strictly prefer the same response; an order that gives
    exactly 0.5 prefers neither, so it counts as disagreement. A judge that always says
    "A" with 0.9 gets p = 0.5 exactly and order_agreement False."""
    p1 = 1.0 - p_a_second_swapped  # P(response 1) as read from the swapped order
    agree = (p_a_first > 0.5 and p1 > 0.5) or (p_a_first < 0.5 and p1 < 0.5)
    return 0.5 + (p_a_first - p_a_second_swapped) / 2.0, agree


def ensemble(ps: list[float]) -> float:
    """Mean of per-principle probabilities (the paper ensembles over principles)."""
    if not ps:
        raise ValueError("ensemble of no probabilities")
    return math.fsum(ps) / len(ps)


def clamp(p: float, lo: float = COT_BAND[0], hi: float = COT_BAND[1]) -> float:
    """Clip ``p`` into ``[lo, hi]`` (default: the paper's 0.4–0.6 band for CoT labels)."""
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"clamp band must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    return min(hi, max(lo, p))


def to_preference(p_first_better: float) -> tuple[bool, float]:
    """(chosen_is_first, p_chosen) with p_chosen ≥ 0.5. An exact tie (0.5) picks response 1
    with p_chosen 0.5, a label that carries no preference signal."""
    return (True, p_first_better) if p_first_better >= 0.5 else (False, 1.0 - p_first_better)


def degenerate(p_values: list[float], tol: float = DEGENERATE_TOL) -> bool:
    """True when every judgment of a pair is a coin flip: |P(A) − 0.5| ≤ ``tol`` for all
    principles in both orders (log P(A) == log P(B) everywhere, e.g. a judge that returns
    constant log-probs). Such a pair carries no information and becomes an error with
    reason ``degenerate_judgment``. A judge with position bias (P(A)=0.9 whatever the
    order) is *not* degenerate: it shows up as p = 0.5 with order_agreement False."""
    return bool(p_values) and all(abs(p - 0.5) <= tol for p in p_values)


class PairLabel(NamedTuple):
    p_first_better: float     # soft label: P(response 1 is better), after ensembling and clamping
    order_agreement: bool     # the principle-ensembled P(A) of each order prefers the same response


def label_pair(p_a_first: list[float], p_a_swapped: list[float],
               band: tuple[float, float] | None = None) -> PairLabel:
    """One pair's label from per-principle P(A) values (same principle order in both lists).

    p = clamp(ensemble(order_average per principle), *band) (no clamp when ``band`` is None);
    order_agreement compares the ensembled first order with the ensembled swapped order.
    Raises ``RowError("degenerate_judgment")`` when ``degenerate(all values)``."""
    if len(p_a_first) != len(p_a_swapped) or not p_a_first:
        raise ValueError(f"need one P(A) per principle in both orders, got {len(p_a_first)} and {len(p_a_swapped)}")
    if degenerate([*p_a_first, *p_a_swapped]):
        raise RowError("degenerate_judgment",
                       f"P(A) = 0.5 for all {len(p_a_first)} principle(s) in both orders (judge gives no signal)")
    p = ensemble([order_average(a, b)[0] for a, b in zip(p_a_first, p_a_swapped)])
    _, agree = order_average(ensemble(p_a_first), ensemble(p_a_swapped))
    return PairLabel(clamp(p, *band) if band else p, agree)


# ---------------------------------------------------------------- ids

def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _canon(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def principle_key(principle) -> str:
    """``"<id>@<12 hex of the comparison text>"``: pass this as ``cache_key``'s
    ``principle_id`` so editing a principle's wording invalidates its cached labels."""
    return f"{principle.id}@{hashlib.sha256(_nfc(principle.comparison).encode('utf-8')).hexdigest()[:12]}"


def cache_key(prompt_messages: list[dict], response_a: str, response_b: str, principle_id: str,
              judge_model: str, template_version: str = JUDGE_TEMPLATE_VERSION, cot: bool = False) -> str:
    """sha256 hex of the canonical JSON of one judgment. Stable across processes; a/b order
    matters (the swapped order is a different judgment)."""
    doc = {"prompt": [[m["role"], _nfc(m["content"])] for m in prompt_messages],
           "a": _nfc(response_a), "b": _nfc(response_b), "principle": principle_id,
           "judge": judge_model, "template": template_version, "cot": bool(cot)}
    return hashlib.sha256(_canon(doc)).hexdigest()


def pair_id(prompt_id: str, response_a: str, response_b: str) -> str:
    """24 hex (96 bits, as prompt ids) naming the unordered pair {a, b} under ``prompt_id``
    (either order → same id)."""
    lo, hi = sorted((_nfc(response_a), _nfc(response_b)))
    return hashlib.sha256(_canon([prompt_id, lo, hi])).hexdigest()[:ID_HEX]


# ---------------------------------------------------------------- pair selection

class PairSelection(NamedTuple):
    pairs: list[tuple[int, int]]            # (i, j), i < j: indices into ``responses``, texts distinct
    duplicates: list[tuple[int, ...]]       # index groups with identical text; the first index is kept


def select_pairs(responses: list[str], mode: Literal["all", "sample"] = "all", n: int | None = None,
                 seed: int = 0, key: str = "") -> PairSelection:
    """Which pairs of one prompt's K responses to judge.

    Exact duplicates (same text after NFC) are paired only once: their first index stays,
    the group is returned in ``duplicates`` — the stage records one error per group, id
    ``pair_id(prompt_id, text, text)``, reason ``duplicate_responses``.
    ``"all"``: every unordered pair of distinct responses, in (i, j) order.
    ``"sample"``: ``n`` of those pairs, without replacement, deterministic in (seed, key)
    (pass the prompt_id as ``key``); all of them when fewer exist. Filter out failed
    generations before calling this."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(responses):
        groups.setdefault(_nfc(r), []).append(i)
    keep = sorted(g[0] for g in groups.values())
    dups = [tuple(g) for g in groups.values() if len(g) > 1]
    pairs = list(itertools.combinations(keep, 2))
    if mode == "sample":
        if n is None or n < 1:
            raise ValueError(f"mode 'sample' needs n >= 1 pairs per prompt, got {n!r}")
        if n < len(pairs):
            digest = hashlib.sha256(f"pairs:{seed}:{key}".encode("utf-8")).digest()
            pairs = sorted(random.Random(int.from_bytes(digest[:8], "big")).sample(pairs, n))
    elif mode != "all":
        raise ValueError(f"unknown pair selection mode {mode!r}: use 'all' or 'sample'")
    return PairSelection(pairs, dups)


pairs_for_prompt = select_pairs  # the name used in the design notes
