"""The Ray side of the engines: streaming a dataset through a pool of engine actors (Ray Data
``map_batches`` with a callable class), skipping rows an interrupted earlier run already finished."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import socket

import pyarrow as pa
import ray

from actors import EngineConfig, make_engine
from actors.base import EngineError, describe
from actors.models import prepare_model
from actors.sources import tensor_parallel_problem
from workflows.core import stage, storage
from workflows.core.stage import StageContext

log = logging.getLogger(__name__)
ENGINES = "_engines"  # <stage>/_engines/*.json: what each actor's engine runs as (for the summary)


def start_engine(cfg: EngineConfig, engines_dir: tuple | None = None, factory: str | None = None):
    """An actor's engine: ``make_engine(cfg)``, or ``factory`` ("module:callable") called with
    ``cfg``; recorded in ``engines_dir`` (see ``record_engine``) once built."""
    if factory:
        module, _, attr = factory.partition(":")
        engine = getattr(importlib.import_module(module), attr)(cfg)
    else:
        engine = make_engine(cfg)
    record_engine(engine, engines_dir)
    return engine


def record_engine(engine, engines_dir: tuple | None) -> None:
    """Called by a pool's actor once its engine is built: writes the engine's name, device and
    number format (with the reason it was chosen, on *that* node's processor) into the stage's
    ``_engines/``. ``engines_dir`` is ``(filesystem, path)`` resolved on the driver, so actors
    need no storage settings of their own. A failed write costs only this summary line."""
    if not engines_dir:
        return
    fs, path = engines_dir
    info = {**describe(engine), "host": socket.gethostname()}
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{info['host']}-{os.getpid()}-{key}.json") as f:
            f.write(json.dumps(info, sort_keys=True).encode())
    except OSError as e:
        log.warning("could not record engine %s in %s (%s); the stage summary will not list it", info["engine"], path, e)


def engines_used(*stage_dirs: str) -> list[dict]:
    """The distinct engines the actors of these stage directories recorded, each with ``actors``
    (how many actors ran it), in a stable order."""
    seen: dict[str, dict] = {}
    for d in stage_dirs:
        for f in storage.list_files(storage.join(d, ENGINES), ".json"):
            info = storage.read_json(f)
            info.pop("host", None)
            load_s = info.pop("load_s", None)
            key = json.dumps(info, sort_keys=True)
            entry = seen.setdefault(key, {**info, "actors": 0})
            entry["actors"] += 1
            if load_s is not None:  # the slowest actor's load: what the stage waited for
                entry["load_s"] = max(load_s, entry.get("load_s", 0.0))
    return [seen[k] for k in sorted(seen)]


def fit_cpus(engine: EngineConfig, cluster_cpus: float) -> float:
    """CPUs to reserve per actor. A pool that takes every CPU starves the read and write
    tasks around it and the pipeline deadlocks, so on CPU-only pools at least one CPU is
    left for them (the actor's torch threads are set separately by ``torch_threads``)."""
    if engine.num_gpus or cluster_cpus < 2 or engine.concurrency * engine.num_cpus <= cluster_cpus - 1:
        return engine.num_cpus
    return max(0.01, (cluster_cpus - 1) / engine.concurrency)


def pool_args(engine: EngineConfig) -> dict:
    """Ray Data actor-pool sizing from the engine config."""
    cpus = fit_cpus(engine, ray.cluster_resources().get("CPU", 0))
    if cpus != engine.num_cpus:
        print(f"note: {engine.concurrency} actors × {engine.num_cpus} CPUs would leave no CPU for reading and "
              f"writing; reserving {cpus:.2f} CPUs per actor instead (threads stay at "
              f"{engine.torch_threads or max(1, int(engine.num_cpus))})")
    args = {"batch_size": engine.batch_size, "num_cpus": cpus,
            "compute": ray.data.ActorPoolStrategy(size=engine.concurrency)}
    if engine.num_gpus:
        args["num_gpus"] = engine.num_gpus
    if engine.concurrency > 1:  # on a cluster, one engine per node before two on one (a no-op on a laptop)
        args["scheduling_strategy"] = "SPREAD"
    return args


def check_engine(engine: EngineConfig) -> None:
    """Fail on the driver, in one clear line, before a pool of actors fails one by one."""

    if engine.backend in ("auto", "transformers", "vllm"):
        source = prepare_model(engine.model)  # a GGUF model is converted once, here (vLLM loads the copy)
        if engine.backend != "transformers":
            problem = tensor_parallel_problem(source.path, engine.vllm.tensor_parallel_size)
            if problem:
                raise EngineError(f"engine.vllm.tensor_parallel_size: {problem}")


BLOCKS_PER_ACTOR = 4


def block_rows(todo: int, checkpoint_rows: int, engine: EngineConfig) -> int:
    """Rows per block: at most ``checkpoint_rows``, and small enough that every actor gets
    ``BLOCKS_PER_ACTOR`` blocks — rows differ in cost (a revised red-team prompt takes three
    generations, a kept helpful one takes one), and one slow block must not leave the others
    idle — but never below one batch."""
    per_actor = -(-todo // (engine.concurrency * BLOCKS_PER_ACTOR))
    return max(1, min(checkpoint_rows, max(per_actor, engine.batch_size)))


class _Saving:
    """Ray Data actor UDF around a stage's worker (``inner``): runs it on a block and writes the
    raw rows itself, at once and whole (``stage.write_whole``), before taking the next block. So a
    killed run loses only the blocks its actors were working on — never finished blocks queued
    behind a separate write step. Returns one row per block: how many raw rows it saved."""

    inner: type

    def __init__(self, raw_dir: tuple, worker_kwargs: dict):
        self.fs, self.dir = raw_dir
        self.fs.create_dir(self.dir, recursive=True)
        self.worker = self.inner(**worker_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        import uuid

        out = self.worker(table)
        stage.write_whole(out, self.fs, f"{self.dir}/{uuid.uuid4().hex}.parquet")
        return pa.table({"saved": [out.num_rows]})


def _saving(worker_cls: type) -> type:
    """``_Saving`` around ``worker_cls``, named after it (Ray names the actors and the progress bar so)."""
    return type(worker_cls.__name__, (_Saving,), {"inner": worker_cls, "__module__": __name__})


def stream_through_pool(ctx: StageContext, input_uri: str, id_col: str, worker_cls: type,
                        engine: EngineConfig, worker_kwargs: dict, total: int, checkpoint_rows: int,
                        check: bool = True) -> int:
    """Append raw rows for every input row not yet in ``<stage>/_raw``; returns rows sent.
    Input is cut into blocks of at most ``checkpoint_rows``; each becomes one raw file, written by
    the actor that made it as soon as it is done — the unit of work an interrupted run keeps.
    ``check``: load-check the model on the driver first (off when an ``engine_factory`` builds
    the engines)."""
    done = stage.done_ids(ctx.dir, id_col)
    todo = total - len(done)
    if done:
        print(f"[{ctx.name}] resuming: {len(done)} of {total} rows already done, {max(todo, 0)} to go")
    if todo <= 0:
        return 0
    if check:
        check_engine(engine)
    fs, path = storage.resolve(input_uri)
    ds = ray.data.read_parquet(path, filesystem=fs)
    if done:
        ds = ds.map_batches(stage.drop_done, batch_format="pyarrow",
                            fn_kwargs={"id_col": id_col, "done": pa.array(sorted(done), pa.string())})
    rows = block_rows(todo, checkpoint_rows, engine)
    ds = ds.repartition(target_num_rows_per_block=rows)
    worker_kwargs = {**worker_kwargs, "engines_dir": storage.resolve(ctx.path(ENGINES))}
    # a whole block per call (the engines cut it into batch_size micro-batches themselves)
    ds = ds.map_batches(_saving(worker_cls), batch_format="pyarrow", **{**pool_args(engine), "batch_size": rows},
                        fn_constructor_kwargs={"raw_dir": storage.resolve(ctx.path(stage.RAW)),
                                               "worker_kwargs": worker_kwargs})
    ds.materialize()  # runs the pipeline; what it holds is one small row per block
    return todo
