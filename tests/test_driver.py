import pytest

from workflows.core.errors import ConfigError
from workflows.driver import Recipe, plan, result_hash


def _stage(**kw):
    return plan(Recipe(stages=[{"stage": "preference", **kw}]))[0].config


def test_pool_sizing_does_not_change_the_result_hash_anywhere():
    a = _stage(policy={"batch_size": 4}, judges=[{"concurrency": 1}])
    b = _stage(policy={"batch_size": 16}, judges=[{"concurrency": 3}])
    c = _stage(policy={"batch_size": 4, "model": "other"}, judges=[{"concurrency": 1}])
    assert result_hash(a, 0) == result_hash(b, 0)
    assert result_hash(a, 0) != result_hash(c, 0)
    assert result_hash(a, 0) != result_hash(a, 1)  # the seed changes results


def test_a_field_added_later_leaves_the_hash_of_older_configs_as_it_was():
    """A run directory half-finished before ``reward``/``rules`` existed must still resume: at their
    defaults they are not in the hash; set, they are."""
    from workflows.core import stage as stage_mod
    from workflows.core.typed import to_dict
    from workflows.driver import _RUNTIME_FIELDS, _without_resources

    cfg = plan(Recipe(stages=[{"stage": "ppo", "reward_fn": "m:f"}]))[0].config
    older = {k: v for k, v in _without_resources(to_dict(cfg)).items()
             if k not in _RUNTIME_FIELDS and k not in ("reward", "rules")}
    assert result_hash(cfg, 0) == stage_mod.config_hash({**older, "_seed": 0})
    rules = plan(Recipe(stages=[{"stage": "ppo", "reward": "rules"}]))[0].config
    mine = plan(Recipe(stages=[{"stage": "ppo", "reward": "rules", "rules": {"harmful_sources": ["x"]}}]))[0].config
    assert len({result_hash(cfg, 0), result_hash(rules, 0), result_hash(mine, 0)}) == 3


@pytest.mark.parametrize("stages, where", [
    ([], "recipe: stages"),
    ([{"path": "x"}], "recipe: stages[0]"),
    ([{"stage": "nope"}], "recipe: stages[0].stage"),
    ([{"stage": "prompts"}, {"stage": "prompts"}], "recipe: stages[1].name"),
])
def test_plan_errors_name_the_stage(stages, where):
    with pytest.raises(ConfigError) as e:
        plan(Recipe(stages=stages))
    assert str(e.value).startswith(where)
