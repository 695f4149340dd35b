"""The gold gate before the constitution's judge rewards (``reward: judge`` in ppo and grpo) or
labels (``labeler: judge`` in online_dpo) the policy's own answers.

The driver calls ``check`` before such a stage starts (or resumes). With ``judge.gold`` set, the
judge labels those human-labeled pairs the way the training job will judge — the same engine, the
same constitution and principles per pair, both orders — through the preference stage's gate
(``workers.gate_judge``), into ``<stage>/_gold/``. Below ``judge.min_agreement`` (or above
``judge.max_position_bias``) the stage stops with one line naming the figures and the fix before a
single rollout, or goes on with a warning (``on_gold_fail: warn``); the figures go into the stage's
summary. A job that resumes is checked again (the label cache makes that free)."""
from __future__ import annotations

from workflows.core import storage
from workflows.core.constitution import load_constitution
from workflows.core.stage import StageContext
from workflows.judging.config import PreferenceConfig, gold_location
from workflows.judging.workers import gate_judge


def check(cfg, ctx: StageContext) -> dict | None:
    """Gate ``cfg`` (a PPOConfig, GRPOConfig or OnlineDPOConfig) on its judge's gold figures; None
    when the stage has no judge or no ``judge.gold``."""
    j = cfg.judge
    if cfg.reward != "judge" or not j.gold:
        return None
    pcfg = PreferenceConfig(constitution=j.constitution, judges=[j.engine], both_orders=True,
                            principles_per_pair=j.principles, gold=gold_location(j.gold),
                            min_agreement=j.min_agreement, max_position_bias=j.max_position_bias,
                            on_gold_fail=j.on_gold_fail, engine_factory=j.engine_factory)
    fresh = not storage.exists(ctx.path("_ray"))  # no training has started: nothing of it to keep
    return gate_judge(pcfg, ctx, load_constitution(j.constitution), fresh)
