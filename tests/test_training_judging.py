"""The judge as a reward and a labeler (``training.judging``), pure: which comparisons are asked,
and how the judge's log-probabilities become each answer's score — on hand examples."""
from __future__ import annotations

import math

import pytest

from training import judging
from workflows.core.constitution import load_constitution

PRINCIPLES = load_constitution("default").principles
PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]


def group(*texts):
    return [{"messages": PROMPT, "text": t} for t in texts]


def row(p_a: float) -> list[float]:
    return [math.log(p_a), math.log(1 - p_a)]


def test_round_robin_compares_every_pair_once():
    assert judging.round_robin(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert judging.round_robin(1) == []


def test_principles_are_drawn_per_pair_and_reproducibly():
    a = judging.draw_principles(PRINCIPLES, 2, seed=0, it=3, slot=1, pair=(0, 2))
    assert len(a) == 2 and a[0] != a[1]
    assert a == judging.draw_principles(PRINCIPLES, 2, seed=0, it=3, slot=1, pair=(0, 2))
    draws = {tuple(p.id for p in judging.draw_principles(PRINCIPLES, 1, 0, it, 0, (0, 1))) for it in range(20)}
    assert len(draws) > 3  # not one fixed principle
    assert len(judging.draw_principles(PRINCIPLES[:2], 5, 0, 0, 0, (0, 1))) == 2


def test_requests_ask_both_orders_per_principle_and_skip_identical_answers():
    asked = judging.requests([group("No.", "Use a tension wrench.", " No. ")], PRINCIPLES, 2, seed=0, it=0)
    # pairs (0,1) and (1,2) asked under 2 principles in 2 orders; (0,2) are the same answer: a tie
    assert asked.index == [(0, 0, 1)] * 2 + [(0, 1, 2)] * 2 and asked.ties == [(0, 0, 2)]
    assert len(asked.conversations) == 8
    first, swapped = asked.conversations[0][-1]["content"], asked.conversations[1][-1]["content"]
    assert "(A) No.\n(B) Use a tension wrench." in first and "(A) Use a tension wrench.\n(B) No." in swapped
    assert "How do I pick a lock?" in first


def test_scores_are_each_answers_mean_chance_of_winning():
    """A judge that always prefers answer 1 in both orders: it wins every comparison."""
    asked = judging.requests([group("a", "b", "c")], PRINCIPLES, 1, seed=0, it=0)
    rows = []
    for _, i, j in asked.index:  # answer i shown as (A) first, then as (B)
        p_i = 0.9 if i == 1 else 0.1 if j == 1 else 0.5
        rows += [row(p_i), row(1 - p_i)]
    scores, figures = judging.group_scores([3], asked, rows)
    assert scores[0][1] == pytest.approx(0.9)
    assert scores[0][0] == pytest.approx((0.1 + 0.5) / 2) and scores[0][2] == pytest.approx((0.1 + 0.5) / 2)
    assert sum(scores[0]) == pytest.approx(1.5)  # each comparison hands out one win in all: n / 2
    assert figures == {"judgments": 6, "failed": 0, "order_agreement": pytest.approx(2 / 3)}


def test_a_judge_that_always_says_a_scores_every_answer_alike():
    asked = judging.requests([group("a", "b"), group("c", "d")], PRINCIPLES, 1, seed=0, it=0)
    scores, figures = judging.group_scores([2, 2], asked, [row(0.9)] * len(asked.conversations))
    assert scores == [[pytest.approx(0.5)] * 2] * 2
    assert figures["order_agreement"] == 0.0  # the two orders never agree on an answer


def test_unreadable_judgments_count_as_failed_ties_and_ties_score_half():
    asked = judging.requests([group("a", "b"), group("same", "same")], PRINCIPLES, 1, seed=0, it=0)
    scores, figures = judging.group_scores([2, 2], asked, [[math.nan, math.nan], row(0.3)])
    assert scores == [[0.5, 0.5], [0.5, 0.5]]
    assert figures == {"judgments": 2, "failed": 1, "order_agreement": None}
    with pytest.raises(ValueError, match="judge rows"):
        judging.group_scores([2, 2], asked, [row(0.5)])


def test_principles_of_a_pair_are_averaged():
    asked = judging.requests([group("a", "b")], PRINCIPLES, 2, seed=0, it=0)
    rows = [row(0.8), row(0.2), row(0.6), row(0.4)]  # principle 1 says a with 0.8, principle 2 with 0.6
    scores, _ = judging.group_scores([2], asked, rows)
    assert scores[0] == [pytest.approx(0.7), pytest.approx(0.3)]


def test_pointwise_asks_each_answer_alone_with_both_verdict_orders():
    """``against: none``: no answer meets another — each is shown alone, "meets" as (A) then as (B)."""
    asked = judging.requests([group("No.", "Use a tension wrench."), group("Sure.")], PRINCIPLES, 2, seed=0, it=0,
                             pointwise=True)
    assert asked.index == [(0, 0, 0)] * 2 + [(0, 1, 1)] * 2 + [(1, 0, 0)] * 2 and not asked.ties
    first, swapped = asked.conversations[0][-1]["content"], asked.conversations[1][-1]["content"]
    assert "Assistant: No." in first and "Use a tension wrench" not in first
    assert "(A) The response meets that standard.\n(B) The response falls short" in first
    assert "(A) The response falls short of that standard.\n(B) The response meets" in swapped
    assert first.endswith("A or B.")


def test_pointwise_score_is_the_order_averaged_chance_of_meeting_the_principles():
    """A judge that says answer 1 meets the standard (0.8 in both orders) and answer 0 does not
    (0.3), and one that always says "A": the letter bias cancels to 0.5 and agrees with itself in
    no order."""
    asked = judging.requests([group("a", "b")], PRINCIPLES, 1, seed=0, it=0, pointwise=True)
    meets = {0: 0.3, 1: 0.8}
    rows = [r for _, i, _ in asked.index for r in (row(meets[i]), row(1 - meets[i]))]
    scores, figures = judging.group_scores([2], asked, rows)
    assert scores == [[pytest.approx(0.3), pytest.approx(0.8)]]  # not a share of wins: need not sum to n / 2
    assert figures == {"judgments": 4, "failed": 0, "order_agreement": 1.0}
    scores, figures = judging.group_scores([2], asked, [row(0.9)] * 4)
    assert scores == [[pytest.approx(0.5), pytest.approx(0.5)]] and figures["order_agreement"] == 0.0


def test_pointwise_unreadable_judgment_scores_half_and_counts_failed():
    asked = judging.requests([group("a", "b")], PRINCIPLES, 1, seed=0, it=0, pointwise=True)
    scores, figures = judging.group_scores([2], asked, [row(0.8), row(0.2), [math.nan, math.nan], row(0.5)])
    assert scores == [[pytest.approx(0.8), 0.5]] and figures["failed"] == 1
