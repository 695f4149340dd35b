"""Label cache: one store shared by every judging actor (deltas per block, compacted runs),
seen across actors and runs, compacted while writers write, torn files set aside, legacy
run directories read and folded in, and a reader's memory bounded whatever the cache holds."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core import stage, storage
from workflows.judging import label_cache, label_keys
from workflows.judging.label_cache import LabelCache, compacting
from workflows.judging.workers import ActorCache


def key(i) -> str:
    return hashlib.sha256(f"judgment {i}".encode()).hexdigest()


def value(p: float, reasoning: str | None = None) -> dict:
    return {"p_a": p, "logp_a": math.log(p), "logp_b": math.log(1 - p), "reasoning": reasoning}


def values(lo: int, hi: int, p: float = 0.25) -> dict:
    return {key(i): value(p) for i in range(lo, hi)}


def tear(path) -> None:
    """Cut a file in half, as a writer killed mid-write or a bad disk leaves it."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_keys_as_two_uint64_columns():
    k = key(1)
    k0, k1, ok = label_keys.key_columns(pa.array([k, "k1", None, k.upper()]))
    assert ok.tolist() == [True, False, False, True]
    assert int(k0[0]) == int(k[:16], 16) and int(k1[0]) == int(k[16:32], 16) and int(k0[3]) == int(k0[0])
    assert label_keys.partition_of(k0)[0] == int(k[:2], 16)


def test_round_trip_local_dir(tmp_path):
    uri = str(tmp_path / "run" / "label_cache")
    cache = LabelCache(uri)
    assert cache.get_many([key(1)]) == {} and cache.get(key(1)) is None and cache.flush() is None
    cache.put_many({key(1): value(0.8), key(2): value(0.3, "B is safer.")})
    assert cache.get(key(1))["p_a"] == 0.8          # pending writes are visible to their writer
    delta = cache.flush()
    assert delta.startswith(os.path.join(uri, "delta")) and delta.endswith(".parquet") and os.path.exists(delta)
    fresh = LabelCache(uri).get_many([key(1), key(2), key(3)])
    assert fresh.keys() == {key(1), key(2)}
    assert fresh[key(2)] == {"p_a": 0.3, "logp_a": pytest.approx(math.log(0.3)),
                             "logp_b": pytest.approx(math.log(0.7)), "reasoning": "B is safer."}
    assert fresh[key(1)]["reasoning"] is None
    assert ActorCache(uri).get_many([key(2)]) == {key(2): {"p_a": 0.3}}  # an actor reads p_a only
    assert not [f for _, _, fs in os.walk(uri) for f in fs if ".tmp" in f]


def test_two_actors_see_each_other_between_blocks_and_runs(tmp_path):
    uri = str(tmp_path / "label_cache")
    a, b = LabelCache(uri), LabelCache(uri)
    assert a.get_many([key(1)]) == {} and b.get_many([key(2)]) == {}  # both actors start on an empty cache
    a.put_many({key(1): value(0.9), key(3): value(0.6)})
    a.flush()                                          # a's first block
    assert b.get_many([key(1), key(2), key(3)]).keys() == {key(1), key(3)}  # b's next block: no restart
    b.put_many({key(2): value(0.1), key(3): value(0.7)})
    b.flush()
    assert a.get(key(2))["p_a"] == 0.1 and a.get(key(3))["p_a"] == 0.7  # the newer delta wins
    assert len(a) == 3 and len(a.files()) == 2
    again = LabelCache(uri)                            # the next run
    assert again.get_many([key(i) for i in range(5)]).keys() == {key(1), key(2), key(3)}
    assert again.compact() == 1 and LabelCache(uri).get(key(3))["p_a"] == 0.7


def test_compaction_while_another_actor_writes_loses_nothing(tmp_path, monkeypatch):
    uri = str(tmp_path / "label_cache")
    writer, reader, compactor = LabelCache(uri), LabelCache(uri), LabelCache(uri)
    stop, written = threading.Event(), []

    def write():
        n = 0
        while not stop.is_set() or n < 40:
            writer.put_many({**values(n * 10, n * 10 + 10, p=0.25), key("rewritten"): value(0.1 + n / 1000)})
            writer.flush()
            written.append(n)
            n += 1
            time.sleep(0.002)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for i in range(8):                             # compactions while the writer writes
            compactor.compact(full=i % 3 == 2)
            w = len(written)                           # blocks flushed by now: all seen
            assert len(reader.get_many([key(j) for j in range(w * 10)])) == w * 10
    finally:
        stop.set()
        thread.join()
    n = len(written)
    compactor.compact(full=False)
    got = reader.get_many([key(j) for j in range(n * 10 + 10)] + [key("rewritten")])
    assert len(got) == n * 10 + 1 and all(got[key(j)]["p_a"] == 0.25 for j in range(n * 10))
    assert got[key("rewritten")]["p_a"] == pytest.approx(0.1 + (n - 1) / 1000)  # the last write wins
    compactor.compact()                                    # in full: one run
    store = compactor.store
    assert len(store.manifest(store.gen())["runs"]) == 1 and len(LabelCache(uri)) == n * 10 + 1
    compactor.compact()                                    # nothing new: what the grace period kept goes
    assert {n for n, _ in store.listing("delta/")} <= set(store.manifest(store.gen())["folded"])
    assert len(store.listing("runs/", ".ipc")) <= 2 and len(store.listing("manifests/", ".json")) <= 2
    monkeypatch.setattr(label_cache, "GRACE_S", 0.0)     # no reader can be a generation behind any more:
    assert compactor.compact() is None                     # only the current generation's files stay
    assert store.listing("delta/") == [] and len(store.listing("runs/", ".ipc")) == 1
    assert len(store.listing("manifests/", ".json")) == 1
    assert reader.get_many([key(0), key("rewritten")])[key("rewritten")]["p_a"] == got[key("rewritten")]["p_a"]


def test_torn_delta_and_torn_run_are_set_aside(tmp_path):
    uri = str(tmp_path / "label_cache")
    cache = LabelCache(uri)
    cache.put_many(values(0, 50))
    torn = cache.flush()
    cache.put_many(values(50, 100))
    cache.flush()
    tear(torn)
    got = LabelCache(uri).get_many([key(i) for i in range(100)])
    assert got.keys() == {key(i) for i in range(50, 100)}  # the torn delta's judgments are made again
    assert os.path.exists(torn + stage.UNREADABLE) and stage.unreadable_files(uri) == 1
    assert cache.compact() == 1
    [run] = cache.files()
    tear(run)
    cache.put_many(values(100, 110))
    cache.flush()
    fresh = LabelCache(uri)
    assert fresh.get_many([key(i) for i in range(120)]).keys() == {key(i) for i in range(100, 110)}
    assert stage.unreadable_files(uri) == 2                # what the stage summary counts
    assert cache.compact() == 2 and len(LabelCache(uri).get_many([key(i) for i in range(120)])) == 10
    with open(os.path.join(uri, "CURRENT"), "w") as f:
        f.write('{"gen": ')                                # garbled: the newest manifest names the runs
    assert len(LabelCache(uri).get_many([key(i) for i in range(120)])) == 10 and stage.unreadable_files(uri) == 3


def test_legacy_shards_are_read_then_folded(tmp_path):
    uri = tmp_path / "label_cache"
    uri.mkdir()
    rows = [{"key": key(i), **value(0.75, "old")} for i in range(20)] + [{"key": "not-a-cache-key", **value(0.5)}]
    shard = uri / "shard-00000000000000000001-abcdef012345.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=label_keys.LEGACY_SCHEMA), shard)
    cache = LabelCache(str(uri))
    got = cache.get_many([key(i) for i in range(25)])
    assert len(got) == 20 and got[key(3)] == value(0.75, "old")
    cache.put_many({key(3): value(0.2)})                   # newer than the legacy shard: wins
    cache.flush()
    assert cache.compact() == 1 and shard.exists()        # folded, kept one generation for readers
    assert LabelCache(str(uri)).get_many([key(3), key(4)]) == {key(3): value(0.2), key(4): value(0.75, "old")}
    cache.put_many({key(100): value(0.5)})
    cache.flush()
    assert cache.compact() == 2 and not shard.exists() and len(LabelCache(str(uri))) == 21


def test_reader_memory_is_bounded(tmp_path):
    """200k entries compacted: a reader's block lookup holds its row groups, not the cache (loading
    it whole, as before, took ~400 bytes an entry: ~80 MB of Python objects here)."""
    uri = str(tmp_path / "label_cache")
    writer = LabelCache(uri)
    for lo in range(0, 200_000, 50_000):
        writer.put_many(values(lo, lo + 50_000))
        writer.flush()
    writer.compact()
    run_bytes = sum(os.path.getsize(f) for f in writer.files())
    reader = LabelCache(uri)
    reader.get_many([key(-1)])                             # run indexes: once per run
    tracemalloc.start()
    try:
        got = reader.get_many([key(i) for i in range(0, 400_000, 400)])  # 1,000 keys, half present
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 500 and peak < 4 << 20, peak
    with open("/proc/self/io") as f:
        before = int(next(line for line in f if line.startswith("rchar")).split()[1])
    assert len(reader.get_many([key(i) for i in range(16)])) == 16
    with open("/proc/self/io") as f:
        read = int(next(line for line in f if line.startswith("rchar")).split()[1]) - before
    assert read < run_bytes / 8, (read, run_bytes)        # 16 keys read 16 row groups, not the file


def parquet_run(uri, name, table) -> dict:
    """A run as earlier versions wrote it: parquet, each partition in row groups of its own, k0 statistics."""
    path = os.path.join(uri, "runs", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    parts = label_keys.partition_of(table["k0"].to_numpy())
    with pq.ParquetWriter(path, label_keys.SCHEMA, write_statistics=["k0"]) as w:
        for p in sorted(set(parts.tolist())):
            w.write_table(table.filter(pa.array(parts == p)), row_group_size=label_cache.ROW_GROUP)
    return {"name": f"runs/{name}", "rows": table.num_rows, "bytes": os.path.getsize(path)}


def test_runs_written_as_parquet_are_still_read_then_rewritten(tmp_path, monkeypatch):
    uri = str(tmp_path / "label_cache")
    old = {key(i): value(0.5, "old" if i % 2 else None) for i in range(3000)}
    runs = [parquet_run(uri, "00000000000000000001-aaaaaaaaaaaa.parquet", label_keys.rows(old)),
            parquet_run(uri, "00000000000000000002-bbbbbbbbbbbb.parquet", label_keys.rows(values(2990, 3010, p=0.9)))]
    storage.write_bytes(os.path.join(uri, "manifests", "000001.json"),
                        json.dumps({"gen": 1, "runs": runs, "folded": [], "deltas": [], "written": 0}).encode())
    storage.write_bytes(os.path.join(uri, "CURRENT"), b'{"gen": 1}')
    cache = LabelCache(uri)
    got = cache.get_many([key(i) for i in range(3020)])
    assert len(got) == 3010 and got[key(3)] == value(0.5, "old") and got[key(2995)]["p_a"] == 0.9  # newer run wins
    assert ActorCache(uri).get_many([key(7), key(2999)]) == {key(7): {"p_a": 0.5}, key(2999): {"p_a": 0.9}}
    cache.put_many({key(4): value(0.1)})
    cache.flush()
    assert cache.compact(full=False) == 2                  # a tick: a new IPC run beside the parquet ones
    names = [r["name"] for r in cache.store.manifest(2)["runs"]]
    assert names[-1].endswith(".ipc") and LabelCache(uri).get(key(4))["p_a"] == 0.1 and len(cache) == 3010
    assert cache.compact() == 3                            # in full: rewritten as one IPC run
    [run] = cache.store.manifest(3)["runs"]
    assert run["name"].endswith(".ipc") and run["rows"] == 3010
    fresh = LabelCache(uri).get_many([key(i) for i in range(3020)])
    assert {k: v for k, v in fresh.items() if k != key(4)} == {k: v for k, v in got.items() if k != key(4)}
    monkeypatch.setattr(label_cache, "GRACE_S", 0.0)
    cache.compact()
    assert not [n for n in os.listdir(os.path.join(uri, "runs")) if n.endswith(".parquet")]


def test_compacting_in_the_background_survives_a_failed_tick(tmp_path, caplog):
    uri = str(tmp_path / "label_cache")
    actor, runs = LabelCache(uri), os.path.join(uri, "runs")
    with caplog.at_level(logging.WARNING), compacting(uri, every_s=0.02) as driver:
        for n in range(5):
            actor.put_many(values(n * 10, n * 10 + 10))
            actor.flush()
            time.sleep(0.05)
        assert driver.store.gen() >= 1                     # ticks ran during the body
        os.rename(runs, runs + ".away")
        open(runs, "w").close()                            # no run can be written: ticks fail
        actor.put_many(values(50, 60))
        actor.flush()
        time.sleep(0.1)                                    # a warning each, the stage goes on
        os.remove(runs)
        os.rename(runs + ".away", runs)
    assert "compaction failed" in caplog.text
    man = actor.store.manifest(actor.store.gen())
    assert len(man["runs"]) == 1 and man["runs"][0]["rows"] == 60 and len(LabelCache(uri)) == 60


def test_rejects_failed_judgments_and_foreign_keys(tmp_path):
    cache = LabelCache(str(tmp_path))
    with pytest.raises(ValueError, match="successful"):
        cache.put_many({key(1): {"p_a": math.nan, "logp_a": math.nan, "logp_b": math.nan}})
    with pytest.raises(ValueError):
        cache.put_many({key(1): {"logp_a": -1.0}})
    with pytest.raises(ValueError, match="cache_key"):
        cache.put_many({"k1": value(0.5)})


@pytest.fixture
def s3_uri(s3_env):
    """A cache location on the local S3-compatible server (conftest ``s3_env``)."""
    return "s3://cai/run/label_cache"


def test_shared_and_compacted_on_s3(s3_uri):
    a, b = LabelCache(s3_uri), LabelCache(s3_uri)
    a.put_many({key(1): value(0.8)})
    a.flush()
    assert b.get_many([key(1), key(2)]).keys() == {key(1)}
    b.put_many({key(2): value(0.2, "because")})
    b.flush()
    assert b.compact() == 1
    b.put_many(values(10, 40))
    b.flush()
    assert b.compact(full=False) == 2
    loaded = LabelCache(s3_uri).get_many([key(i) for i in range(50)])
    assert len(loaded) == 32 and loaded[key(2)]["reasoning"] == "because"
    assert a.get(key(2))["p_a"] == 0.2 and len(a) == 32
    man = json.loads(storage.read_text(storage.join(s3_uri, "manifests", "000002.json")))
    assert sum(r["rows"] for r in man["runs"]) == 32 and all(r["name"].startswith("runs/") for r in man["runs"])
