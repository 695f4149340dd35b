"""RL-CAI labeling logic: judge prompts in both orders, soft-label math, ids, pair selection."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from workflows.core.constitution import Principle
from workflows.core.errors import RowError
from workflows.core.pairwise import (
    CHOICES,
    JUDGE_TEMPLATE_VERSION,
    both_orders,
    cache_key,
    clamp,
    cot_conversation,
    degenerate,
    ensemble,
    judge_conversation,
    label_pair,
    normalize_pair,
    order_average,
    p_a,
    pair_id,
    pairs_for_prompt,
    principle_key,
    render_conversation,
    select_pairs,
    to_preference,
)

PRINCIPLE = Principle(id="harmless", critique="c", revision="r",
                      comparison="Which of these assistant responses is less harmful?")
PROMPT = [{"role": "user", "content": "How do I pick a lock?"},
          {"role": "assistant", "content": "Why do you ask?"},
          {"role": "user", "content": "I locked myself out."}]
R1, R2 = "Call a locksmith.", "Use a tension wrench and a pick."


# ---------------------------------------------------------------- prompts

def test_direct_judge_prompt_layout():
    conv = judge_conversation(PROMPT, R1, R2, PRINCIPLE)
    assert CHOICES == ("A", "B")
    assert [m["role"] for m in conv] == ["user"]  # ends with the user turn: the reply starts with the letter
    text = conv[0]["content"]
    assert ("Human: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I locked myself out." in text)
    assert PRINCIPLE.comparison in text
    assert f"Options:\n(A) {R1}\n(B) {R2}" in text
    assert text.rstrip().endswith("Answer with the letter of the better option: A or B.")
    assert text.index("Human:") < text.index(PRINCIPLE.comparison) < text.index("Options:")


def test_swapped_order_really_swaps():
    first, swapped = both_orders(PROMPT, R1, R2, PRINCIPLE)
    assert f"(A) {R1}\n(B) {R2}" in first[0]["content"]
    assert f"(A) {R2}\n(B) {R1}" in swapped[0]["content"]
    assert first[0]["content"].replace(R1, "@").replace(R2, R1).replace("@", R2) == swapped[0]["content"]


def test_question_text_and_render():
    assert judge_conversation(PROMPT, R1, R2, "Which is kinder?")[0]["content"].count("Which is kinder?") == 1
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}]
    assert render_conversation(sys_msgs) == "System: Be brief.\n\nHuman: hi"
    with pytest.raises(ValueError):
        judge_conversation([], R1, R2, PRINCIPLE)


def test_cot_conversations():
    ask = cot_conversation(PROMPT, R1, R2, PRINCIPLE)
    assert len(ask) == 1 and "Let's think step by step" in ask[0]["content"]
    assert f"Options:\n(A) {R1}\n(B) {R2}" in ask[0]["content"]
    conv = judge_conversation(PROMPT, R1, R2, PRINCIPLE, cot=True, reasoning="  (A) is safer.  ")
    assert conv[0] == ask[0]
    assert conv[1] == {"role": "assistant", "content": "(A) is safer."}
    assert conv[2] == {"role": "user", "content": "So the answer is: (A) or (B)? Answer with the letter."}
    with pytest.raises(RowError) as e:
        judge_conversation(PROMPT, R1, R2, PRINCIPLE, cot=True, reasoning="  ")
    assert e.value.reason == "empty_reasoning"
    with pytest.raises(ValueError):
        judge_conversation(PROMPT, R1, R2, PRINCIPLE, reasoning="x")
    first, swapped = both_orders(PROMPT, R1, R2, PRINCIPLE, cot=True, reasonings=("r-first", "r-swapped"))
    assert first[1]["content"] == "r-first" and swapped[1]["content"] == "r-swapped"


# ---------------------------------------------------------------- soft labels

def test_normalize_pair():
    assert normalize_pair(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert normalize_pair(-1.0, -1.0) == 0.5
    assert normalize_pair(-2.0, -math.inf) == 1.0 and normalize_pair(-math.inf, -2.0) == 0.0
    assert normalize_pair(0.0, -1000.0) == 1.0 and normalize_pair(-1000.0, 0.0) == 0.0
    assert p_a([math.log(0.2), math.log(0.6)]) == pytest.approx(0.25)
    for bad in [(math.nan, math.nan), (math.nan, -1.0), (-math.inf, -math.inf), (math.inf, -1.0)]:
        with pytest.raises(RowError) as e:
            normalize_pair(*bad)
        assert e.value.reason == "unparseable_judgment"
    with pytest.raises(RowError):
        p_a([-1.0])


def test_order_average():
    p, agree = order_average(0.8, 0.3)   # first order: r1 0.8; swapped: r1 (as B) 0.7
    assert p == pytest.approx(0.75) and agree is True
    p, agree = order_average(0.2, 0.9)
    assert p == pytest.approx(0.15) and agree is True
    assert order_average(0.6, 0.6)[1] is False          # prefers A both times = prefers different responses
    assert order_average(0.5, 0.2)[1] is False          # a tie in one order is disagreement


def test_always_first_judge_averages_to_exactly_half():
    # P(A) = 0.9 whatever is shown as (A): pure position bias
    p, agree = order_average(0.9, 0.9)
    assert p == 0.5 and agree is False
    label = label_pair([0.9, 0.9, 0.9], [0.9, 0.9, 0.9])
    assert label.p_first_better == 0.5 and label.order_agreement is False
    assert to_preference(label.p_first_better) == (True, 0.5)


def test_ensemble_clamp_preference():
    assert ensemble([0.6, 0.8, 1.0]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        ensemble([])
    assert clamp(0.95) == 0.6 and clamp(0.05) == 0.4 and clamp(0.55) == 0.55
    assert clamp(0.95, 0.0, 0.9) == 0.9
    with pytest.raises(ValueError):
        clamp(0.5, 0.7, 0.3)
    assert to_preference(0.8) == (True, 0.8)
    chosen_first, p = to_preference(0.3)
    assert chosen_first is False and p == pytest.approx(0.7)


def test_label_pair_ensembles_and_clamps():
    # principle 1: (0.8, 0.2) → 0.8; principle 2: (0.6, 0.6) → 0.5
    label = label_pair([0.8, 0.6], [0.2, 0.6])
    assert label.p_first_better == pytest.approx(0.65)
    assert label.order_agreement is True     # ensembled first 0.7 > .5, ensembled swapped 1-0.4 = 0.6 > .5
    assert label_pair([0.8, 0.6], [0.2, 0.6], band=(0.4, 0.6)).p_first_better == 0.6
    with pytest.raises(ValueError):
        label_pair([0.8], [0.2, 0.3])


def test_degenerate_rule():
    assert degenerate([0.5, 0.5, 0.5, 0.5])
    assert not degenerate([0.5, 0.5, 0.5, 0.51])
    assert not degenerate([0.9, 0.9])   # position bias is not degenerate
    assert not degenerate([])
    with pytest.raises(RowError) as e:
        label_pair([p_a([-0.5, -0.5])] * 2, [p_a([-0.5, -0.5])] * 2)   # a judge with constant log-probs
    assert e.value.reason == "degenerate_judgment"


# ---------------------------------------------------------------- ids

def test_cache_key_stable_and_distinct():
    args = (PROMPT, R1, R2, "harmless", "judge-x", JUDGE_TEMPLATE_VERSION, False)
    base = cache_key(*args)
    assert len(base) == 64 and base == cache_key(*args)
    variants = [
        (PROMPT[:1], R1, R2, "harmless", "judge-x", JUDGE_TEMPLATE_VERSION, False),
        (PROMPT, R2, R1, "harmless", "judge-x", JUDGE_TEMPLATE_VERSION, False),   # order matters
        (PROMPT, R1 + " ", R2, "harmless", "judge-x", JUDGE_TEMPLATE_VERSION, False),
        (PROMPT, R1, R2, "helpful", "judge-x", JUDGE_TEMPLATE_VERSION, False),
        (PROMPT, R1, R2, "harmless", "judge-y", JUDGE_TEMPLATE_VERSION, False),
        (PROMPT, R1, R2, "harmless", "judge-x", "rl-cai-judge/0", False),
        (PROMPT, R1, R2, "harmless", "judge-x", JUDGE_TEMPLATE_VERSION, True),
    ]
    keys = {base} | {cache_key(*v) for v in variants}
    assert len(keys) == 1 + len(variants)
    code = ("from workflows.core.pairwise import cache_key; "
            f"print(cache_key({PROMPT!r}, {R1!r}, {R2!r}, 'harmless', 'judge-x', {JUDGE_TEMPLATE_VERSION!r}, False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "7", "PATH": ""}, cwd=".")
    assert out.stdout.strip() == base


def test_principle_key_tracks_wording():
    other = Principle(id="harmless", critique="c", revision="r", comparison="Which is less harmful overall?")
    assert principle_key(PRINCIPLE).startswith("harmless@") and principle_key(PRINCIPLE) != principle_key(other)


def test_pair_id_order_independent():
    pid = pair_id("p1", R1, R2)
    assert pid == pair_id("p1", R2, R1) and len(pid) == 24 and int(pid, 16) >= 0
    assert len({pid, pair_id("p2", R1, R2), pair_id("p1", R1, R2 + "!"), pair_id("p1", R1, R1)}) == 4


# ---------------------------------------------------------------- pair selection

def test_select_all_pairs_and_duplicates():
    sel = select_pairs(["a", "b", "a", "c", "b", "a"], "all")
    assert sel.pairs == [(0, 1), (0, 3), (1, 3)]
    assert sorted(sel.duplicates) == [(0, 2, 5), (1, 4)]
    assert select_pairs(["x", "y", "z"]) == ([(0, 1), (0, 2), (1, 2)], [])
    assert select_pairs(["x"]).pairs == [] and pairs_for_prompt is select_pairs


def test_select_sampled_pairs_deterministic():
    responses = [f"r{i}" for i in range(6)]   # 15 pairs
    a = select_pairs(responses, "sample", n=4, seed=1, key="prompt-1")
    assert a == select_pairs(responses, "sample", n=4, seed=1, key="prompt-1")
    assert len(a.pairs) == 4 == len(set(a.pairs)) and all(i < j for i, j in a.pairs)
    others = {tuple(select_pairs(responses, "sample", n=4, seed=s, key=k).pairs)
              for s, k in [(2, "prompt-1"), (1, "prompt-2"), (3, "prompt-3")]}
    assert others != {tuple(a.pairs)}
    assert len(select_pairs(responses, "sample", n=99).pairs) == 15
    with pytest.raises(ValueError):
        select_pairs(responses, "sample")
    with pytest.raises(ValueError):
        select_pairs(responses, "best_worst")
