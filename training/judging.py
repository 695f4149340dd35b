"""The constitution's judge on the policy's own answers — ``reward: judge`` for ppo/grpo (direct
RLAIF) and ``labeler: judge`` for online_dpo — as pure logic (no Ray, no torch).

Each prompt's answers are compared pairwise, every pair once (a round robin within the prompt's
group), under ``principles`` principles drawn per pair from the constitution, each asked in both
orders: the preference stage's judge (``workflows.core.pairwise``: the same prompts, P(A) read from
the letters' log-probabilities, order-averaged, ensembled over principles). An answer's score is its
mean probability of being preferred over the other answers of its prompt — in [0, 1], 0.5 when all
tie — so GRPO's group-relative advantage and online DPO's best-over-worst read it directly.

Pointwise (``against: none``): each answer is judged on its own — does it meet the principle's
standard, asked with the two verdicts in both orders (``pairwise.both_verdict_orders``) — and scores
that order-averaged probability, ensembled over its principles; no other answer is involved, so
one sample per prompt is enough.

Two identical answers are a tie without asking the judge. A principle whose judgment cannot be read
(NaN log-probabilities, an engine error) is left out of its pair; a pair with none left is a tie and
counted in ``failed``. ``order_agreement`` is the share of judged (pair, principle) whose two orders
prefer the same answer — the judge's position consistency, for the summary.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from workflows.core.errors import RowError
from workflows.core.pairwise import CHOICES, both_orders, both_verdict_orders, ensemble, order_average, p_a

__all__ = ["CHOICES", "Judgments", "round_robin", "draw_principles", "requests", "group_scores"]


def round_robin(n: int) -> list[tuple[int, int]]:
    """Every unordered pair of ``n`` answers once: (0, 1), (0, 2), ... (n-2, n-1)."""
    return list(itertools.combinations(range(n), 2))


def draw_principles(principles: list, k: int, seed: int, it: int, slot: int, pair: tuple[int, int]) -> list:
    """``k`` distinct principles for one comparison, the same on every run with the same seed."""
    rng = random.Random(f"judge:{seed}:{it}:{slot}:{pair[0]}:{pair[1]}")
    return rng.sample(list(principles), min(k, len(principles)))


@dataclass
class Judgments:
    """The conversations to score (two per pair and principle: answer i as (A), then as (B)) and,
    per conversation pair, which group and answers it compares."""

    conversations: list[list[dict]] = field(default_factory=list)
    index: list[tuple[int, int, int]] = field(default_factory=list)  # (group, i, j) per two conversations; i == j: pointwise
    ties: list[tuple[int, int, int]] = field(default_factory=list)  # identical answers: not asked


def requests(groups: list[list[dict]], principles: list, k: int, seed: int, it: int,
             pointwise: bool = False) -> Judgments:
    """What to ask the judge for ``groups`` (each a prompt's samples: ``messages`` and ``text``):
    every pair of a group, or with ``pointwise`` every answer on its own."""
    out = Judgments()
    for g, group in enumerate(groups):
        if pointwise:
            for i, s in enumerate(group):
                for principle in draw_principles(principles, k, seed, it, g, (i, i)):
                    out.conversations.extend(both_verdict_orders(list(s["messages"]), s["text"], principle))
                    out.index.append((g, i, i))
            continue
        for i, j in round_robin(len(group)):
            a, b = group[i]["text"], group[j]["text"]
            if a.strip() == b.strip():
                out.ties.append((g, i, j))
                continue
            for principle in draw_principles(principles, k, seed, it, g, (i, j)):
                out.conversations.extend(both_orders(list(group[i]["messages"]), a, b, principle))
                out.index.append((g, i, j))
    return out


def group_scores(sizes: list[int], asked: Judgments, rows: list[list[float]]) -> tuple[list[list[float]], dict]:
    """(each answer's score per group, figures) from the judge's ``choice_logprobs`` rows for
    ``asked.conversations``: its mean chance of being preferred, or pointwise its chance of meeting
    the principles (0.5 when none could be read). Figures: ``judgments`` (conversations scored), ``failed`` (pairs with no
    readable principle), ``order_agreement`` (None when nothing was judged)."""
    if len(rows) != len(asked.conversations):
        raise ValueError(f"{len(rows)} judge rows for {len(asked.conversations)} conversations")
    per_pair: dict[tuple[int, int, int], list[float]] = {}
    agreed = readable = 0
    for n, key in enumerate(asked.index):
        per_pair.setdefault(key, [])
        try:
            p, agree = order_average(p_a(rows[2 * n]), p_a(rows[2 * n + 1]))
        except RowError:
            continue
        per_pair[key].append(p)
        readable += 1
        agreed += agree
    wins = [[[] for _ in range(size)] for size in sizes]
    failed = 0
    for key in [*per_pair, *asked.ties]:
        g, i, j = key
        ps = per_pair.get(key)
        if key in per_pair and not ps:
            failed += 1
        p = ensemble(ps) if ps else 0.5
        wins[g][i].append(p)
        if j != i:
            wins[g][j].append(1.0 - p)
    scores = [[sum(w) / len(w) if w else 0.5 for w in group] for group in wins]
    return scores, {"judgments": len(asked.conversations), "failed": failed,
                    "order_agreement": agreed / readable if readable else None}
