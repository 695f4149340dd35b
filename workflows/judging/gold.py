"""The gold gate: know the judge before paying for millions of labels.

A judge that is too small, or that just prefers whatever is shown first, labels noise — and
nothing downstream says so until a reward model has learnt it. So before a stage labels at
scale, ``workers.judge_gold`` has its judge(s) label a small file of human choices (``gold``, any
``human.load_human`` format: prompt, chosen, rejected) with exactly the stage's judging
settings (principles per pair, both orders, chain of thought, every judge, the constitution;
the label cache is used), through the same actor pool, into ``<stage>/_gold/``. Each gold pair
is shown with the human's choice as (A) or (B) by ``pairs.chosen_first`` (a hash of the pair
id), so a judge that always answers "A" cannot look good.

This module is the pure part (no Ray): ``load_gold`` reads the file, and
``gold_figures(label_rows, gold_rows)`` scores AI labels of gold pairs, for any stage that has
them (the preference stage's gate, the evaluate stage's judge agreement). Its keys:

- ``n``: gold pairs; ``agreed``: how many the AI labeled with the human's choice;
- ``agreement`` = agreed / n with its Wilson 95% interval ``agreement_lo``/``agreement_hi``.
  A tie (p_chosen 0.5, no preference) and a gold pair the judge could not label both count
  as disagreement;
- ``position_bias``: share of labeled gold pairs whose two presentation orders prefer
  different answers (1 − the order-agreement rate); None when only one order is asked;
- ``unparseable``: gold pairs without a label (unparseable or degenerate judgments).

``gate(figures, min_agreement, on_fail, where, max_position_bias)``: below ``min_agreement``, or
with a position bias above ``max_position_bias``, it raises
``GoldGateError`` (a ``ConfigError``: one line with the figures, the threshold and the fix)
with ``on_fail="stop"``, or prints one warning line with ``"warn"``.
"""
from __future__ import annotations

from workflows.core import console, stage, storage
from workflows.core.errors import ConfigError
from workflows.judging.agreement import content_key
from workflows.judging.config import gold_location
from workflows.judging.human import load_human, require_rows, text_of
from workflows.core.pairwise import DEGENERATE_TOL
from workflows.stats import wilson

GOLD = stage.GOLD
FIX = ("use a bigger judge (vLLM, or an OpenAI-compatible endpoint), cot: true, or more principles_per_pair; "
       "or set on_gold_fail: warn (--on-gold-fail warn) to label anyway")


class GoldGateError(ConfigError):
    """The judge disagrees with the human gold labels too often to be trusted at scale."""


# ---------------------------------------------------------------- figures (pure)

def _agrees(label: dict, gold: dict) -> bool:
    """The AI chose the human's answer, with some preference (a tie is no agreement)."""
    return text_of(label["chosen"]) == text_of(gold["chosen"]) and float(label["p_chosen"]) > 0.5 + DEGENERATE_TOL


def gold_figures(label_rows: list[dict], gold_rows: list[dict]) -> dict:
    """Agreement of AI labels with human gold labels, and the judge's position bias (see the
    module docstring). Labels are matched to gold rows by content: prompt and the two answers."""
    labels: dict[str, dict] = {}
    for row in label_rows:
        labels.setdefault(content_key(row), row)
    agreed = unlabeled = tested = flipped = 0
    for g in gold_rows:
        label = labels.get(content_key(g))
        if label is None:
            unlabeled += 1
            continue
        agreed += _agrees(label, g)
        if label.get("order_agreement") is not None:
            tested, flipped = tested + 1, flipped + (not label["order_agreement"])
    n = len(gold_rows)
    ci = wilson(agreed, n) if n else None
    return {"n": n, "agreed": agreed, "agreement": ci.value if ci else None,
            "agreement_lo": ci.lo if ci else None, "agreement_hi": ci.hi if ci else None,
            "position_bias": flipped / tested if tested else None, "order_tested": tested,
            "unparseable": unlabeled}


def describe(figures: dict) -> str:
    """The figures in one phrase, e.g. ``agreement 0.300 (95% CI 0.108–0.603) on n=10 gold
    pairs, position bias 1.000, 0 unparseable``."""
    f = figures
    agreement = "n/a" if f["agreement"] is None else \
        f"{f['agreement']:.3f} (95% CI {f['agreement_lo']:.3f}–{f['agreement_hi']:.3f})"
    bias = "n/a (one order asked)" if f["position_bias"] is None else f"{f['position_bias']:.3f}"
    return (f"agreement {agreement} on n={f['n']} gold pairs, position bias {bias} "
            f"(share of pairs whose two orders disagree), {f['unparseable']} unparseable")


def gate(figures: dict, min_agreement: float, on_fail: str, where: str, max_position_bias: float | None = None) -> bool:
    """True when agreement ≥ ``min_agreement`` and (when set) position bias ≤ ``max_position_bias``.
    Otherwise ``on_fail="stop"`` raises ``GoldGateError`` and ``"warn"`` prints one warning line
    and returns False."""
    bias = figures.get("position_bias")
    short = [f"below min_agreement {min_agreement}"] if figures["agreement"] is None or \
        figures["agreement"] < min_agreement else []
    if max_position_bias is not None and bias is not None and bias > max_position_bias:
        short.append(f"position bias above max_position_bias {max_position_bias} (its verdicts follow the "
                     "order the answers are shown in)")
    if not short:
        return True
    problem = f"the judge fails the gold gate: {describe(figures)}; {' and '.join(short)}"
    if on_fail == "stop":
        raise GoldGateError(where, problem, FIX)
    console.say(f"warning: {where}: {problem}; labeling anyway (on_gold_fail: warn)")
    return False


# ---------------------------------------------------------------- the gold file

def load_gold(path: str, stage_name: str) -> tuple[list[dict], list[dict]]:
    """(gold rows, skipped rows) of ``path``; ``ConfigError`` when it is missing or has no usable pair."""
    where, path = f"stage {stage_name}: gold {path}", gold_location(path)
    if not storage.exists(path):
        raise ConfigError(where, "file not found",
                          "point gold (--gold) at human-labeled pairs: prompt, chosen, rejected")
    rows, skipped = load_human(path, stage=f"{stage_name}:gold")
    return require_rows(rows, skipped, where, "gold pair"), skipped
