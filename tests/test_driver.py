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
