"""The machinery every training job shares: Ray Train around DeepSpeed (docs/training.md).

Driver side, ``run_training`` starts a ``TorchTrainer`` (N workers, ``FailureConfig``,
``CheckpointConfig``, Ray storage in ``<stage>/_ray``). The rows come from ``training.inputs``:
train rows up to 256 MB reach every worker as one object-store object and each takes its
``rank::world`` slice of them sorted by id; a bigger input arrives as a Ray Dataset split across
workers (order preserved, so a restarted run sees the same shards). The held-out rows go to every
worker through the object store, and each worker evaluates its ``rank::world`` slice.

Worker side, a job's train loop tokenizes its shard into a :class:`Task` and calls ``fit``:
``deepspeed.initialize`` on the process group Ray Train made (gloo on CPU, NCCL on GPU) →
restore from the newest whole checkpoint (``training.checkpoints``) → optimizer steps (micro-batches × grad_accum) with
metrics all-reduced over ranks → every ``checkpoint_every`` steps each rank writes its DeepSpeed
shard and calls ``ray.train.report(..., checkpoint=)`` (Ray merges the shards into one
directory; ``checkpoints.save``) → final eval → parameters gathered (ZeRO-3: one module at a time) → rank 0 writes a
Hugging Face directory, ``metrics.jsonl``, ``loss.png`` and ``train_summary.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from training import checkpoints, inputs
from training.config import choose_precision, deepspeed_config, lr_lambda
from training.data import length_grouped_batches, tokenize_rows
from workflows.core import stage, storage
from workflows.core.errors import CaiError, DataError
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict, to_dict

SUMMARY_FILE, METRICS_FILE, CURVES_FILE = "train_summary.json", "metrics.jsonl", "loss.png"
FAULT_MARKER = "_fault_injected"


class TrainingError(CaiError):
    """A training run failed for a reason that is not a config or data error."""


# ================================================================ driver side

def resolve_ref(name: str, ctx: StageContext) -> str:
    """An earlier stage's output named ``name``, else ``name`` itself (a path or model spec);
    local paths made absolute, since Ray workers do not share the driver's working directory."""
    return ctx.resolve(name)


def run_training(job: str, loop: Callable[[dict], None], cfg, ctx: StageContext, id_col: str) -> dict:
    """Train with ``loop`` on ``cfg.num_workers`` Ray Train workers; returns the summary rank 0
    wrote (``train_summary.json``) with the driver's row counts and wall time added."""
    import ray
    from ray.train import DataConfig

    started = time.time()
    seed = ctx.seed if cfg.seed is None else cfg.seed
    train, held_out, rows = inputs.input_datasets(resolve_ref(cfg.input, ctx), id_col, cfg.eval_fraction, seed)
    need = cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum
    if rows["train"] < need:
        raise DataError(f"stage {ctx.name}: {rows['train']} training rows, but one optimizer step needs "
                        f"num_workers × micro_batch_size × grad_accum = {need} — add data or lower those")
    model = prepare_start_model(resolve_ref(cfg.model, ctx))
    loop_config = {"seed": seed, "model": model, "id_col": id_col,
                   "eval_rows": ray.put(held_out) if held_out is not None else None}
    if isinstance(train, pa.Table):
        fit_trainer(loop, cfg, ctx, job, {**loop_config, "train_rows": ray.put(train)})
    else:
        with warnings.catch_warnings():  # Ray's own default sets a field it has deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the same rows reach the same worker in the same order after a restart
        train.context.enable_progress_bars = False  # per-worker bars garble the driver's log; fit prints steps
        fit_trainer(loop, cfg, ctx, job, {**loop_config, "train_rows": None}, datasets={"train": train},
                    dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ingest},
                                              enable_shard_locality=False))
    summary = storage.read_json(ctx.path(SUMMARY_FILE))
    summary["rows"] = {**rows, **summary["rows"]}
    summary["rows"]["unused_by_split"] = rows["train"] - summary["rows"]["train_shards"]  # Ray's equal split
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def prepare_start_model(model: str) -> str:
    """A GGUF starting model is converted once here on the driver, not by every worker."""
    if not storage.is_remote(model):
        from actors.models import prepare_model

        prepare_model(model)
    return model


def fit_trainer(loop: Callable[[dict], None], cfg, ctx: StageContext, job: str, loop_config: dict,
                datasets: dict | None = None, dataset_config=None) -> None:
    """Run ``loop`` on ``cfg.num_workers`` Ray Train workers (resources, failures, checkpoints and
    storage in ``<stage>/_ray`` from ``cfg``); ``loop_config`` is added to the train-loop config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage_dir = ctx.dir if storage.is_remote(ctx.dir) else os.path.abspath(ctx.dir)
    storage.makedirs(stage_dir)
    fs, path = storage.resolve(ctx.path("_ray"))
    resources = {"CPU": _worker_cpus(cfg), **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    extra = {"dataset_config": dataset_config} if dataset_config is not None else {}
    trainer = TorchTrainer(
        loop, datasets=datasets or {}, torch_config=TorchConfig(timeout_s=cfg.collective_timeout_s),
        train_loop_config={"cfg": to_dict(cfg), "job": job, "stage_dir": stage_dir, "precision": cfg.precision,
                           **loop_config},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=job, storage_path=path, storage_filesystem=fs if storage.is_remote(ctx.dir) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        **extra)
    storage.delete(ctx.path(SUMMARY_FILE))  # written by rank 0 as the job's last act: the proof it finished
    try:
        _fit_interruptibly(trainer)
    except Exception as e:  # noqa: BLE001 — surface our own error if a worker raised one
        raise _user_error(e) or TrainingError(f"stage {ctx.name}: training failed: {e}") from e
    if not storage.exists(ctx.path(SUMMARY_FILE)):
        # Ray Train returns normally after a Ctrl-C abort; the job did not finish. Its checkpoints
        # stay, so the same command resumes it.
        raise KeyboardInterrupt


def _fit_interruptibly(trainer) -> None:
    """``trainer.fit()`` on a daemon thread while the main thread waits, so Ctrl-C raises
    ``KeyboardInterrupt`` here at once. On the main thread Ray Train installs its own SIGINT
    handler instead: a "graceful abort" that asks the train controller to stop — and a terminal's
    Ctrl-C reaches every process of the run, the controller too, so the ask fails and the handler
    calls ``sys.exit`` (exit 1, no message, after ~20 s); it also never restores the previous
    handler. Leaving the process ends the trainer's actors with it; its checkpoints stay, so the
    same command resumes the job."""
    box: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 — handed to the waiting thread, never printed here
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]


def _worker_cpus(cfg) -> float:
    """CPUs to reserve per worker. Workers that take every CPU leave none for the Ray Data read
    feeding them, and the run hangs; so one CPU is kept free (torch threads still follow
    ``cpus_per_worker``)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    total = ray.cluster_resources().get("CPU", 0)
    if total < 2 or cfg.num_workers * cfg.cpus_per_worker <= total - 1:
        return cfg.cpus_per_worker
    cpus = max(0.01, (total - 1) / cfg.num_workers)
    print(f"note: {cfg.num_workers} workers × {cfg.cpus_per_worker} CPUs would leave no CPU to read the data; "
          f"reserving {cpus:.2f} CPUs per worker instead")
    return cpus


def _user_error(exc: BaseException) -> CaiError | None:
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CaiError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return None


def finish_stage(ctx: StageContext, summary: dict) -> dict:
    """Write ``summary.md`` and ``_SUCCESS`` (rows, steps, final loss, eval metrics, seconds, model
    directory); rows that tokenization dropped are the stage's errors, by reason."""
    from workflows.core.summary import stage_lines

    rows, loss = summary["rows"], summary["final_loss"]
    dropped: dict[str, int] = {}
    for key, n in rows.items():  # train and held-out rows alike
        if key.startswith(("dropped:", "eval_dropped:")):
            dropped[key.split(":", 1)[1]] = dropped.get(key.split(":", 1)[1], 0) + n
    info = {"stage": ctx.name, "inputs": rows["input"], "outputs": rows["trained"], "errors": sum(dropped.values()),
            "errors_by_reason": dropped, "datasets": {}, "metrics": {}, "config_hash": ctx.config_hash,
            "seconds": summary["seconds"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
            "steps": summary["steps"], "final_loss": loss, "eval": summary["eval"],
            "model_dir": summary["model_dir"], "training": summary}
    unused = rows.get("unused_to_balance_workers", 0) + rows.get("unused_by_split", 0)
    lines = stage_lines(info) + [
        f"rows: {rows['trained']} trained + {rows.get('eval', 0)} held out for eval + "
        f"{sum(n for k, n in rows.items() if k.startswith('dropped:'))} dropped (errors) + {unused} unused "
        "(to give every worker the same number of rows)",
        f"steps {summary['steps']} on {summary['world_size']} workers (ZeRO-{summary['zero_stage']}, "
        f"{summary['precision']}: {summary.get('precision_reason') or 'as configured'}), "
        f"final loss {'n/a' if loss is None else f'{loss:.4f}'}, "
        f"resumed {summary['resumes']}×",
        "eval: " + (", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()) or "none"),
        f"model: `{summary['model_dir']}`; curves: `{ctx.path(CURVES_FILE)}`; metrics: `{ctx.path(METRICS_FILE)}`"]
    storage.write_text(ctx.path("summary.md"), "\n".join([f"# Stage `{ctx.name}`", ""] + [f"- {x}" for x in lines]) + "\n")
    print(f"\n== {ctx.name} ==\n" + "\n".join(f"  {x}" for x in lines))
    stage.write_success(ctx.dir, info)
    return info


# ================================================================ worker side

@dataclass
class Task:
    """What a job gives ``fit``. ``step``/``evaluate``/``probe`` take ``(engine, batch)``;
    ``evaluate`` returns sums (added over ranks, then ``summarize``d); ``finalize(engine, task)``
    runs on every rank after training; ``export(state_dict, dir, module, finalize_result)`` on rank 0."""

    model: torch.nn.Module
    train: list
    eval: list
    collate: Callable[[list], dict]
    step: Callable[[Any, dict], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Any, dict], dict[str, float]]
    summarize: Callable[[dict[str, float]], dict[str, float]]
    probe: Callable[[Any, dict], list[float]]
    export: Callable[[dict, str, torch.nn.Module, dict], None]
    finalize: Callable[[Any, "Task"], dict] | None = None
    counts: dict = field(default_factory=dict)


def config_of(cls, run: dict):
    return from_dict(cls, run["cfg"], f"{run['job']} config")


def setup_worker(cfg, run: dict) -> None:
    """Threads for CPU workers, one seed on every rank (ZeRO-3 partitions each rank's own copy
    of the freshly built model, so new weights must agree), and DeepSpeed on the process group
    Ray Train already made."""
    import deepspeed
    import ray.train.torch

    torch.manual_seed(run["seed"])
    if cfg.gpus_per_worker == 0:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    else:
        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group, no re-init
    run["precision"], run["precision_reason"] = agree_precision(cfg)


def agree_precision(cfg) -> tuple[str, str]:
    """Every rank picks its precision on its own processor (``choose_precision``); all ranks
    must train in the same one, so where they differ (mixed CPUs) all fall back to fp32."""
    choice = choose_precision(cfg)
    picks = [None] * dist.get_world_size()
    dist.all_gather_object(picks, (choice.short, choice.reason))
    if len({p[0] for p in picks}) == 1:
        return choice.short, choice.reason
    return "fp32", "workers disagree on native bfloat16 (mixed processors), so fp32 on all"


def load_items(tokenize: Callable, tok, cfg, run: dict) -> tuple[list, list, dict]:
    """Tokenize this worker's train shard (sorted by id) and all held-out rows; trim every shard
    to the smallest kept count (ranks must take equal steps). Returns items and summed counts."""
    import ray
    import ray.train

    if run["train_rows"] is not None:  # every worker got all rows: each takes its own slice
        rows = sorted(ray.get(run["train_rows"]).to_pylist(), key=lambda r: str(r[run["id_col"]]))
        rows = rows[dist.get_rank()::dist.get_world_size()]
    else:  # this worker's split of a Ray Dataset
        rows = []
        for table in ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow", batch_size=1024):
            rows += table.to_pylist()
        rows.sort(key=lambda r: str(r[run["id_col"]]))
    train, counts = tokenize_rows(tokenize, tok, rows, cfg.max_length)
    held_out = ray.get(run["eval_rows"]).to_pylist() if run["eval_rows"] is not None else []
    evals, eval_counts = tokenize_rows(tokenize, tok, held_out, cfg.max_length)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"train_shards": len(rows), "kept": len(train), **counts})
    keep = min(c["kept"] for c in per_rank)
    total = {k: sum(c.get(k, 0) for c in per_rank) for k in sorted({k for c in per_rank for k in c})}
    total["unused_to_balance_workers"] = total.pop("kept") - keep * len(per_rank)
    total["trained"] = keep * len(per_rank)
    total.update({f"eval_{k}": v for k, v in eval_counts.items()})
    return train[:keep], evals, total


def token_count(batch: dict) -> int:
    """Real (unpadded) tokens in a collated batch: the sum of its attention masks."""
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def evaluate(engine, task: Task, items: list, fn: Callable, mb: int, sharded: bool = False) -> dict[str, float]:
    """Sums of ``fn`` over ``items[rank::world]`` (all ``items`` if they are this rank's shard),
    added over ranks. Every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively): a rank with fewer batches repeats one and drops its results."""
    if not items:
        return {}
    mine = items if sharded else items[dist.get_rank()::dist.get_world_size()]
    n = int(_reduce([math.ceil(len(mine) / mb)], dist.ReduceOp.MAX)[0])
    sums: dict[str, float] = {}
    engine.eval()
    with torch.no_grad():
        for b in range(n):
            chunk = mine[b * mb:(b + 1) * mb]
            for k, v in fn(engine, _to(task.collate(chunk or items[:1]), engine.device)).items():
                sums[k] = sums.get(k, 0.0) + (float(v) if chunk else 0.0)
    engine.train()
    keys = sorted(sums)
    return dict(zip(keys, _reduce([sums[k] for k in keys])))


def full_state_dict(engine, zero3: bool, master: bool = False) -> dict | None:
    """The full (unpartitioned) state dict on rank 0, ``None`` elsewhere; call it on every rank.
    Under ZeRO-3 the parameters are gathered one module at a time, copied, and released. With
    ``master`` (bf16 training) the optimizer's fp32 master weights are taken instead of the bf16
    copies the model computes with: updates smaller than bf16's resolution live only there."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank, sd = dist.get_rank(), {}
    if not zero3 and not master:
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    masters = _plain_masters(engine) if master else {}

    def visit(module, prefix: str) -> None:
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own if zero3 else [], modifier_rank=None):
            for name, p in module.named_parameters(recurse=False):
                full = safe_get_full_fp32_param(p) if master else None  # collective: every rank calls it
                full = masters.get(id(p)) if full is None else full
                if rank == 0:
                    kept = full if full is not None else (p.float() if master else p)  # frozen: no master
                    sd[prefix + name] = kept.detach().cpu().clone()
            if rank == 0:
                for name, b in module.named_buffers(recurse=False):
                    if name not in module._non_persistent_buffers_set:
                        sd[prefix + name] = b.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(engine.module, "")
    return sd if rank == 0 else None


def _plain_masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 with bf16: DeepSpeed's mixed-precision optimizer keeps the fp32 masters itself,
    without a per-parameter mapping — per parameter (``fp32_groups``) or one flat tensor per group
    (``fp32_groups_flat``, the fused variant). Returns them keyed by ``id(param)``."""
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None) or []
    if getattr(opt, "fp32_groups_flat", None):
        masters = [_unflatten_dense_tensors(f, g) for g, f in zip(groups, opt.fp32_groups_flat)]
    else:
        masters = getattr(opt, "fp32_groups", None) or []
    return {id(p): m for g, ms in zip(groups, masters) for p, m in zip(g, ms)}


def merge_lora(sd: dict, scale: float) -> dict:
    """A peft LoRA state dict → plain weights ``W + scale · B @ A``, adapters removed and the
    ``base_model.model.`` prefix stripped."""
    out = {}
    for key, value in sd.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a, b = sd[f"{prefix}.lora_A.default.weight"], sd[f"{prefix}.lora_B.default.weight"]
            value = value + scale * (b.float() @ a.float()).to(value.dtype)
        out[key.replace("base_model.model.", "", 1).replace(".base_layer.", ".")] = value
    return out


def load_lm(spec: str, cfg):
    """The starting causal LM in fp32 on CPU (DeepSpeed moves and casts it), with gradient
    checkpointing and LoRA adapters when configured."""
    from actors.models import load_causal_lm

    model = load_causal_lm(spec, dtype=torch.float32, device="cpu")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    return model


def save_lm(sd: dict, out_dir: str, module, cfg, tokenizer=None) -> None:
    """A plain Hugging Face causal-LM directory from a full state dict (LoRA merged first)."""
    from actors.models import save_plain_lm

    if cfg.lora:
        sd, module = merge_lora(sd, cfg.lora.alpha / cfg.lora.r), module.get_base_model()
    save_plain_lm(sd, module.config, out_dir, tokenizer, getattr(module, "generation_config", None))


def plot_curves(history: list[dict], path: str, title: str) -> None:
    """Train (and eval) loss per step; a second panel with the job's other curves (or the lr)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, keys in ((ax1, ["loss", "eval_loss"]), (ax2, sorted({k for h in history for k in h} - {
            "step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "seconds", "tokens"}) or ["lr"])):
        for k in keys:
            pts = [(h["step"], h[k]) for h in history if h.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-" if k.startswith("eval_") else "-", label=k)
        ax.set(xlabel="step")
        ax.legend(fontsize="small")
    ax1.set(ylabel="loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def fit(task: Task, cfg, run: dict) -> None:
    """The shared train loop (see the module docstring); ``run`` is the train-loop config."""
    import deepspeed

    mb, ga, world = cfg.micro_batch_size, cfg.grad_accum, dist.get_world_size()
    steps_per_epoch = math.ceil(len(task.train) / mb) // ga
    if steps_per_epoch < 1:
        raise DataError(f"{len(task.train)} usable rows per worker cannot fill one step of micro_batch_size × "
                        f"grad_accum = {mb * ga} (row counts: {task.counts}) — add data, raise max_length "
                        "if rows were dropped as response_truncated, or lower those")
    total = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
    params = [p for p in task.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    engine, _, _, sched = deepspeed.initialize(
        model=task.model, model_parameters=[g for g in groups if g["params"]],
        config=deepspeed_config(cfg, run["precision"]),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total)))
    started, lengths = time.time(), [len(x) for x in task.train]
    state = checkpoints.restore(engine, {"step": 0, "history": [], "resumes": 0, "resumed_from": []}, run)
    marker = storage.join(run["stage_dir"], FAULT_MARKER)
    engine.train()
    while state["step"] < total:
        epoch, first = divmod(state["step"], steps_per_epoch)
        batches = length_grouped_batches(lengths, mb, run["seed"] * 100_003 + epoch, cfg.group_by_length)
        for s in range(first, min(steps_per_epoch, first + total - state["step"])):
            if cfg.fail_at_step == state["step"] + 1 and dist.get_rank() == 0 and not storage.exists(marker):
                storage.write_text(marker, f"fault injected at step {cfg.fail_at_step}\n")
                raise RuntimeError(f"fault injection: fail_at_step={cfg.fail_at_step} (a test-only setting)")
            t0, lr, acc, ntok = time.time(), sched.get_last_lr()[0], {}, 0
            for b in batches[s * ga:(s + 1) * ga]:
                batch = task.collate([task.train[i] for i in b])
                ntok += token_count(batch)
                loss, stats = task.step(engine, _to(batch, engine.device))
                engine.backward(loss)
                engine.step()
                for key, v in {"loss": loss.item(), **stats}.items():
                    acc[key] = acc.get(key, 0.0) + float(v) / ga
            *sums, tokens = _reduce([acc[k] for k in sorted(acc)] + [ntok])
            rec = dict(zip(sorted(acc), (v / world for v in sums)))
            state["step"] += 1
            rec.update(step=state["step"], epoch=epoch, lr=lr, tokens=int(tokens), seconds=round(time.time() - t0, 4))
            if engine.get_global_grad_norm() is not None:
                rec["grad_norm"] = float(engine.get_global_grad_norm())
            if task.eval and cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total:
                rec.update(task.summarize(evaluate(engine, task, task.eval, task.evaluate, mb)))
            state["history"].append(rec)
            if dist.get_rank() == 0:
                # straight to the process's stdout: Ray Train's patched print would log the line twice
                print(f"[{run['job']}] step {state['step']}/{total} loss {rec['loss']:.4f} lr {lr:.2e}",
                      file=sys.__stdout__, flush=True)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < total:
                checkpoints.save(engine, state, rec)
    _finish(engine, task, cfg, run, state, total, time.time() - started)


def write_outputs(stage_dir: str, output: str, export: Callable[[str], None], history: list[dict], title: str) -> str:
    """Rank 0's files of a finished job: ``export(local_dir)`` writes the model, which replaces
    ``<stage_dir>/<output>``; then ``loss.png`` and ``metrics.jsonl`` from ``history``. Returns the
    model directory's URI."""
    out, at = storage.join(stage_dir, output), lambda name: storage.join(stage_dir, name)
    with tempfile.TemporaryDirectory() as d:
        export(d)
        storage.delete(out)
        fs, path = storage.resolve(out)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(d, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        plot_curves(history, os.path.join(d, CURVES_FILE), title)
        with open(os.path.join(d, CURVES_FILE), "rb") as f:
            storage.write_bytes(at(CURVES_FILE), f.read())
    storage.write_text(at(METRICS_FILE), "".join(json.dumps(h) + "\n" for h in history))
    return out


def _finish(engine, task: Task, cfg, run: dict, state: dict, total: int, seconds: float) -> None:
    """Final eval and probe, ``finalize``, gather, then rank 0 exports and writes the reports."""
    import ray.train

    final = task.summarize(evaluate(engine, task, task.eval, task.evaluate, cfg.micro_batch_size)) if task.eval else {}
    hist = state["history"]
    if final and hist:
        hist[-1].update(final)
    probe_items = (task.eval or task.train)[:4]  # outputs before saving, to compare with the export
    engine.eval()
    with torch.no_grad():
        probe = task.probe(engine, _to(task.collate(probe_items), engine.device))
    engine.train()
    extra = task.finalize(engine, task) if task.finalize else {}
    sd = full_state_dict(engine, cfg.zero_stage == 3, master=run["precision"] == "bf16")
    if dist.get_rank() == 0:
        out = write_outputs(run["stage_dir"], cfg.output, lambda d: task.export(sd, d, engine.module, extra), hist,
                            run["job"])
        storage.write_json(storage.join(run["stage_dir"], SUMMARY_FILE), {
            "job": run["job"], "steps": state["step"], "total_steps": total, "world_size": dist.get_world_size(),
            "zero_stage": cfg.zero_stage, "precision": run["precision"],
            "precision_reason": run.get("precision_reason", ""), "model_dir": out,
            "final_loss": hist[-1]["loss"] if hist else None, "eval": final, "probe": probe,
            "probe_ids": [x.id for x in probe_items], "rows": task.counts, "resumes": state["resumes"],
            "resumed_from_steps": state["resumed_from"], "train_seconds": round(seconds, 2), **extra})
    dist.barrier()
    ray.train.report({"step": state["step"], **final})
