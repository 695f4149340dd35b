"""The Ray side of the engines: streaming a dataset through a pool of engine actors (Ray Data
``map_batches`` with a callable class) by numbered input blocks, skipping the blocks an interrupted
earlier run already saved (``workflows.core.blocks``)."""
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
from workflows.core import blocks, console, stage, storage
from workflows.core.errors import DataError
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
    # on a cluster, one engine per node before two on one: Ray Data's actor pools already ask for
    # DataContext.scheduling_strategy, "SPREAD" unless a user changed it (passing it here is a
    # `ray_remote_args`, which Ray 2.60 deprecates)
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
    """Ray Data actor UDF around a stage's worker (``inner``): given block numbers, reads each
    block's input rows itself (``blocks.InputIndex.read``), runs the worker on them and writes the
    raw rows at once and whole (``stage.write_whole``) as ``b<block>-<uuid>.parquet``, before taking
    the next block. So a killed run loses only the blocks its actors were working on, and a resumed
    one sends only the blocks without a raw file. Returns one row per block: its number and the raw
    rows saved."""

    inner: type

    def __init__(self, raw_dir: tuple, worker_kwargs: dict, source: tuple):
        self.fs, self.dir = raw_dir
        self.fs.create_dir(self.dir, recursive=True)
        self.index, self.plan, self.id_col, self.legacy = source
        self.worker = self.inner(**worker_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        saved = []
        for block in table["block"].to_pylist():
            rows = self.index.read(*self.plan.span(block))
            if self.legacy is not None:  # a run directory from before numbered blocks
                rows = stage.drop_done(rows, self.id_col, self.legacy)
                if rows.num_rows == 0:
                    saved.append(0)
                    continue
            out = self.worker(rows)
            stage.write_whole(out, self.fs, f"{self.dir}/{blocks.raw_name(block)}")
            saved.append(out.num_rows)
        return pa.table({"block": table["block"], "saved": saved})


def _saving(worker_cls: type) -> type:
    """``_Saving`` around ``worker_cls``, named after it (Ray names the actors and the progress bar so)."""
    return type(worker_cls.__name__, (_Saving,), {"inner": worker_cls, "__module__": __name__})


def stream_through_pool(ctx: StageContext, input_uri: str, id_col: str, worker_cls: type,
                        engine: EngineConfig, worker_kwargs: dict, checkpoint_rows: int,
                        check: bool = True, label: str | None = None) -> int:
    """Append raw rows for every input block not yet in ``<stage>/_raw``; returns input rows sent.
    The input is cut into numbered blocks of at most ``checkpoint_rows`` rows (``blocks.Plan``,
    fixed when the stage first starts); each becomes one raw file, written by the actor that made it
    as soon as it is done — the unit of work an interrupted run keeps. Resuming reads raw file
    names and footers only, and the actors read only the rows of the blocks left.
    ``check``: load-check the model on the driver first (off when an ``engine_factory`` builds
    the engines). ``label``: the progress line's name (the stage's by default)."""
    index = blocks.input_index(input_uri)
    raw_dir = ctx.path(stage.RAW)
    plan = blocks.load_plan(raw_dir, index.rows, block_rows(index.rows, checkpoint_rows, engine), ctx.name)
    done, legacy_files = blocks.done_blocks(stage.raw_files(ctx.dir), stage.set_aside)
    legacy = blocks.legacy_ids(legacy_files, id_col) if legacy_files else None
    if legacy is not None and len(legacy) and not blocks.any_in(input_uri, id_col, legacy):
        raise DataError(f"stage {ctx.name} was half done by an earlier version of cai-ray whose row ids differ "
                        f"from this version's (none of its {len(legacy)} saved rows is in the input now) — rerun "
                        f"with --restart-from {ctx.name} (a preference stage gets its judgments back from the "
                        "label cache)")
    todo = [k for k in range(plan.blocks) if k not in done]
    left = sum(hi - lo for lo, hi in map(plan.span, todo))
    if done or legacy_files:
        old = f"; {len(legacy)} rows saved by an earlier version are skipped by id" if legacy_files else ""
        console.say(f"[{ctx.name}] resuming: {len(done)} of {plan.blocks} blocks already done "
                    f"({plan.rows - left} of {plan.rows} rows){old}; {left} rows to go")
    if not todo:
        return 0
    if check:
        check_engine(engine)
    worker_kwargs = {**worker_kwargs, "engines_dir": storage.resolve(ctx.path(ENGINES))}
    ds = ray.data.from_items([{"block": k} for k in todo], override_num_blocks=min(len(todo), 200))
    # one block of input rows per call (the engines cut it into batch_size micro-batches themselves)
    ds = ds.map_batches(_saving(worker_cls), batch_format="pyarrow", **{**pool_args(engine), "batch_size": 1},
                        fn_constructor_kwargs={"raw_dir": storage.resolve(raw_dir), "worker_kwargs": worker_kwargs,
                                               "source": (index, plan, id_col, legacy)})
    progress = console.Progress(label or ctx.name, plan.rows, "rows")
    progress.update(done=plan.rows - left)
    for got in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # runs the pipeline: a row per block
        progress.update(add=sum(hi - lo for lo, hi in map(plan.span, got["block"].to_pylist())))
    progress.close()
    return left
