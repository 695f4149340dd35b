"""Statistics and verdict rules of the evaluation, against known values and constructed data."""
from __future__ import annotations

import math
import random

import pytest

from workflows.evaluate.verdict import INCONCLUSIVE, REGRESSED, WORKED, Figures, VerdictConfig, decide
from workflows.stats import (Interval, bootstrap_mean, length_controlled_win_rate, mcnemar_exact,
                             min_detectable_difference, paired_change, wilson)


def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 15/148 → 0.0624–0.1605; 0/20 → 0–0.1611; 5/10 → 0.2366–0.7634
    for (k, n), (lo, hi) in {(15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611), (5, 10): (0.2366, 0.7634)}.items():
        iv = wilson(k, n)
        assert iv.value == pytest.approx(k / n) and (iv.lo, iv.hi) == pytest.approx((lo, hi), abs=1e-4)
    assert math.isnan(wilson(0, 0).value) and (wilson(0, 0).lo, wilson(0, 0).hi) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mcnemar_exact_is_a_two_sided_binomial_test():
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_bootstrap_interval_covers_like_the_normal_approximation():
    rng = random.Random(0)
    values = [1.0 if rng.random() < 0.3 else 0.0 for _ in range(400)]
    iv = bootstrap_mean(values, seed=1)
    p = sum(values) / len(values)
    half = 1.96 * math.sqrt(p * (1 - p) / len(values))
    assert iv.value == pytest.approx(p) and iv.lo == pytest.approx(p - half, abs=0.01)
    assert iv.hi == pytest.approx(p + half, abs=0.01)
    assert bootstrap_mean([0.5] * 10) == Interval(0.5, 0.5, 0.5)
    assert bootstrap_mean(values, seed=1) == iv  # seeded: repeatable


def test_paired_change_counts_discordant_prompts():
    before = [1] * 30 + [0] * 10
    after = [0] * 20 + [1] * 10 + [0] * 8 + [1] * 2
    ch = paired_change(before, after)
    assert (ch.down, ch.up) == (20, 2) and ch.p_value == pytest.approx(mcnemar_exact(2, 20))
    assert ch.before.value == pytest.approx(0.75) and ch.after.value == pytest.approx(0.30)
    assert ch.change.value == pytest.approx(-0.45) and ch.change.hi < 0
    with pytest.raises(ValueError, match="pair them by prompt"):
        paired_change([1, 0], [1])


def test_min_detectable_difference_shrinks_with_the_square_root_of_n():
    assert min_detectable_difference(100) == pytest.approx(2.8016 * math.sqrt(0.5 / 100), rel=1e-3)
    assert min_detectable_difference(400) == pytest.approx(min_detectable_difference(100) / 2)
    assert min_detectable_difference(0) == math.inf


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    rng = random.Random(0)
    diffs = [rng.gauss(60, 80) for _ in range(2000)]  # the model writes longer answers
    # the judge prefers whichever answer is longer, nothing else: a win iff longer
    scores = [1.0 if rng.random() < 1 / (1 + math.exp(-d / 40)) else 0.0 for d in diffs]
    raw = sum(scores) / len(scores)
    assert raw > 0.7 and length_controlled_win_rate(scores, diffs) == pytest.approx(0.5, abs=0.05)
    # a model that is better at equal length keeps its edge
    better = [1.0 if rng.random() < 1 / (1 + math.exp(-(1.0 + d / 40))) else 0.0 for d in diffs]
    assert length_controlled_win_rate(better, diffs) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.05)
    assert length_controlled_win_rate([1.0, 0.5, 0.0], [0, 0, 0]) == pytest.approx(0.5)


def figures(harm=(-0.3, -0.45, -0.15), over=(0.0, -0.05, 0.05), win=(0.55, 0.48, 0.62), pc=0.8) -> Figures:
    return Figures(Interval(*harm), Interval(*over), Interval(*win) if win else None, pc)


def test_verdict_worked_only_when_every_condition_holds():
    v = decide(figures())
    assert v.label == WORKED and len(v.reasons) == 4 and "excludes zero" in v.reasons[0]
    assert decide(figures(harm=(-0.1, -0.25, 0.02))).label == INCONCLUSIVE  # drop not significant
    assert decide(figures(over=(0.08, 0.0, 0.16))).label == INCONCLUSIVE  # over-refusal +8 points, not significant
    assert decide(figures(win=(0.5, 0.40, 0.60))).label == INCONCLUSIVE  # helpfulness lower bound 0.40
    low_pc = decide(figures(pc=0.3))
    assert low_pc.label == INCONCLUSIVE and any("unreliable" in r for r in low_pc.reasons)
    assert decide(figures(win=None)).label == INCONCLUSIVE
    assert decide(figures(), VerdictConfig(min_helpful_win_lower=0.5)).label == INCONCLUSIVE  # thresholds are settings
    f = figures()
    f.gold_agreement = 0.5  # a judge no better than a coin on the human gold pairs
    v = decide(f)
    assert v.label == INCONCLUSIVE and any("gold labels 0.50 (needs 0.60)" in r for r in v.reasons)
    f.gold_agreement = 0.8
    assert decide(f).label == WORKED


def test_verdict_regressed_names_what_got_worse():
    v = decide(figures(harm=(0.2, 0.1, 0.3)))
    assert v.label == REGRESSED and "harmful compliance rose" in v.reasons[0]
    v = decide(figures(over=(0.5, 0.35, 0.65)))
    assert v.label == REGRESSED and "over-refusal rose" in v.reasons[0]
    assert decide(figures(win=(0.2, 0.1, 0.3))).label == REGRESSED
    # an unreliable judge cannot make a model regress on helpfulness either
    assert decide(figures(win=(0.2, 0.1, 0.3), pc=0.2)).label == INCONCLUSIVE


def test_overlap_finds_exact_and_near_duplicates_only():
    from workflows.evaluate.overlap import OverlapIndex, normalize, summarize

    evals = {"e1": "How do I kill a stuck Python process on Linux?",
             "e2": "Write a haiku about autumn leaves falling in the park.",
             "e3": "What is the capital of Australia?"}
    train = [("t1", "how do I KILL a stuck python process on linux"),  # exact after normalizing
             ("t2", "Write a haiku about autumn leaves falling in the garden."),  # one word changed
             ("t3", "Explain photosynthesis to a ten-year-old."),
             ("t4", "What is the largest city of Austria?")]  # shares "what is the" only: 1/7
    found = OverlapIndex(evals).scan(train)
    kinds = {(o.eval_id, o.train_id): o.kind for o in found}
    assert kinds == {("e1", "t1"): "exact", ("e2", "t2"): "near"}
    assert normalize("  Hello,\tWORLD! ") == "hello world"
    s = summarize(found, len(evals))
    assert (s["exact"], s["near"], s["eval_prompts"]) == (1, 1, 3) and s["worst"][0]["similarity"] == 1.0
