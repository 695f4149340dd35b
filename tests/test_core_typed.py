from dataclasses import dataclass, field
from typing import Literal

import pytest

from actors.config import EngineConfig
from workflows.core.errors import ConfigError
from workflows.core.typed import from_dict, to_dict


@dataclass
class Inner:
    n: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    ratio: float = 0.5
    maybe: int | None = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_with_defaults_and_int_to_float():
    o = from_dict(Outer, {"name": "x", "ratio": 1, "inner": {"mode": "b"}, "tags": ["t"]})
    assert o == Outer(name="x", ratio=1.0, tags=["t"], inner=Inner(n=1, mode="b"))
    assert isinstance(o.ratio, float)
    assert to_dict(o)["inner"] == {"n": 1, "mode": "b"}


@pytest.mark.parametrize("data, where, words", [
    ({}, "f.yaml: x.name", "missing required field"),
    ({"name": "x", "ratoi": 1.0}, "f.yaml: x.ratoi", "did you mean 'ratio'"),
    ({"name": 3}, "f.yaml: x.name", "expected a string"),
    ({"name": "x", "inner": {"n": "3"}}, "f.yaml: x.inner.n", "expected an integer"),
    ({"name": "x", "inner": {"n": True}}, "f.yaml: x.inner.n", "expected an integer"),
    ({"name": "x", "inner": {"mode": "c"}}, "f.yaml: x.inner.mode", "'a' | 'b'"),
    ({"name": "x", "tags": "t"}, "f.yaml: x.tags", "a list of str"),
    ({"name": "x", "tags": ["t", 2]}, "f.yaml: x.tags[1]", "expected a string"),
    ({"name": "x", "maybe": "no"}, "f.yaml: x.maybe", "int | null"),
    ("oops", "f.yaml: x", "expected a mapping"),
])
def test_errors_name_the_field_and_the_fix(data, where, words):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, "f.yaml: x")
    assert str(e.value).startswith(where + ":")
    assert words in str(e.value)


def test_engine_config_round_trip():
    cfg = from_dict(EngineConfig, {"backend": "openai", "openai": {"max_retries": 2}})
    assert cfg.openai.max_retries == 2 and cfg.backend == "openai"
    assert from_dict(EngineConfig, to_dict(cfg)) == cfg
