import os

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


def test_a_stage_an_older_version_made_resumes_after_an_upgrade(tmp_path):
    """A run directory made before ``label_field``, ``judge`` (and its nested engine) existed, with
    ``256.0`` where today's default is ``256``, still resumes: its recorded settings are read with
    today's defaults. Setting a new field to something else is a different config."""
    import json

    from workflows.core.stage import StageContext, config_hash
    from workflows.core.typed import to_dict
    from workflows.driver import _check_resumable, _RUNTIME_FIELDS, _without_resources

    def older(cfg, drop):
        d = to_dict(cfg)
        for k in drop:
            d.pop(k)
        return {**d, **({"sync_bucket_mb": 256.0} if "sync_bucket_mb" in d else {})}  # as older versions wrote it

    for stage, drop, changed in [("online_dpo", ("judge",), {"judge": {"principles": 2}}),
                                 ("prompts", ("label_field",), {"label_field": "y"})]:
        cfg = plan(Recipe(stages=[{"stage": stage}]))[0].config
        old = older(cfg, drop)
        ctx = StageContext(str(tmp_path / stage), stage, 0)
        os.makedirs(ctx.dir)
        data = {k: v for k, v in _without_resources(old).items() if k not in _RUNTIME_FIELDS}
        with open(ctx.path("_config.json"), "w") as f:
            json.dump({"config_hash": config_hash({**data, "_seed": 1}), "config": old}, f)
        assert _check_resumable(ctx, result_hash(cfg, 0), None, cfg, 0) is False  # half-finished: resumes
        new = plan(Recipe(stages=[{"stage": stage, **changed}]))[0].config
        with pytest.raises(ConfigError, match="made with a different config"):
            _check_resumable(ctx, result_hash(new, 0), None, new, 0)


def test_an_integral_float_and_its_int_are_one_setting():
    a = plan(Recipe(stages=[{"stage": "sft", "lr": 1}]))[0].config
    b = plan(Recipe(stages=[{"stage": "sft", "lr": 1.0}]))[0].config
    assert result_hash(a, 0) == result_hash(b, 0) != result_hash(plan(Recipe(stages=[{"stage": "sft", "lr": 1.5}]))[0].config, 0)


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
