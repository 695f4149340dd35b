"""Label cache: parquet shards in a run directory, appended by several writers, merged on load."""
from __future__ import annotations

import math

import pytest

from workflows.judging.label_cache import LabelCache


def value(p: float, reasoning: str | None = None) -> dict:
    return {"p_a": p, "logp_a": math.log(p), "logp_b": math.log(1 - p), "reasoning": reasoning}


def test_round_trip_local_dir(tmp_path):
    uri = str(tmp_path / "run" / "label_cache")
    cache = LabelCache(uri)
    assert cache.load() == {} and cache.get("k1") is None and cache.flush() is None
    cache.put_many({"k1": value(0.8), "k2": value(0.3, "B is safer.")})
    assert cache.get("k1")["p_a"] == 0.8          # pending writes are visible to their writer
    shard = cache.flush()
    assert shard.endswith(".parquet") and len(cache.shards()) == 1
    fresh = LabelCache(uri).load()
    assert fresh.keys() == {"k1", "k2"}
    assert fresh["k2"] == {"p_a": 0.3, "logp_a": pytest.approx(math.log(0.3)),
                           "logp_b": pytest.approx(math.log(0.7)), "reasoning": "B is safer."}
    assert fresh["k1"]["reasoning"] is None
    assert not list((tmp_path / "run" / "label_cache").glob("*.tmp"))


def test_two_writers_shards_merge(tmp_path):
    uri = str(tmp_path / "label_cache")
    a, b = LabelCache(uri), LabelCache(uri)
    a.load(), b.load()                               # both actors start on an empty cache
    a.put_many({"a1": value(0.9), "shared": value(0.6)})
    b.put_many({"b1": value(0.1), "shared": value(0.6)})
    a.flush(), b.flush()
    a.put_many({"a2": value(0.7)})
    a.flush()
    assert len(a.shards()) == 3 and len(set(a.shards())) == 3
    merged = LabelCache(uri)
    assert set(merged.load()) == {"a1", "a2", "b1", "shared"} and len(merged) == 4
    assert "b1" not in a.load()                       # read once at start: other writers not seen
    assert merged.compact() is not None and len(merged.shards()) == 1
    assert set(LabelCache(uri).load()) == {"a1", "a2", "b1", "shared"}


def test_rejects_failed_judgments(tmp_path):
    cache = LabelCache(str(tmp_path))
    with pytest.raises(ValueError, match="successful"):
        cache.put_many({"k": {"p_a": math.nan, "logp_a": math.nan, "logp_b": math.nan}})
    with pytest.raises(ValueError):
        cache.put_many({"k": {"logp_a": -1.0}})


@pytest.fixture
def s3_uri(s3_env):
    """A cache location on the local S3-compatible server (conftest ``s3_env``)."""
    return "s3://cai/run/label_cache"


def test_round_trip_s3(s3_uri):
    a, b = LabelCache(s3_uri), LabelCache(s3_uri)
    a.put_many({"k1": value(0.8)})
    b.put_many({"k2": value(0.2, "because")})
    a.flush(), b.flush()
    loaded = LabelCache(s3_uri).load()
    assert set(loaded) == {"k1", "k2"} and loaded["k2"]["reasoning"] == "because"
