"""The train loop every supervised job shares, on a Ray Train worker (docs/training.md), and the
export every job ends with.

A job's train loop tokenizes its shard into a :class:`Task` and calls ``fit``:
``deepspeed.initialize`` on the process group Ray Train made (gloo on CPU, NCCL on GPU) →
restore from the newest whole checkpoint (``training.checkpoints``) → optimizer steps
(micro-batches × grad_accum) with metrics all-reduced over ranks → every ``checkpoint_every``
steps each rank writes its DeepSpeed shard and calls ``ray.train.report(..., checkpoint=)`` (Ray
merges the shards into one directory; ``checkpoints.save``) → final eval → ``finish``: parameters
gathered (ZeRO-3: one module at a time) → rank 0 writes a Hugging Face directory,
``metrics.jsonl``, ``loss.png`` and ``train_summary.json``. PPO has its own loop and the same ``finish``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from actors.models import load_causal_lm, save_plain_lm
from training import checkpoints
from training.data import length_grouped_batches
from training.worker import (CURVES_FILE, FAULT_MARKER, METRICS_FILE, SUMMARY_FILE, JobSpec, ProgressFile, WorkerSettings,
                             all_reduce, deepspeed_config, lr_lambda)
from workflows.core import storage
from workflows.core.errors import DataError


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


def token_count(batch: dict) -> int:
    """Real (unpadded) tokens in a collated batch: the sum of its attention masks."""
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(engine, task: Task, items: list, fn: Callable, mb: int, sharded: bool = False) -> dict[str, float]:
    """Sums of ``fn`` over ``items[rank::world]`` (all ``items`` if they are this rank's shard),
    added over ranks. Every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively): a rank with fewer batches repeats one and drops its results."""
    if not items:
        return {}
    mine = items if sharded else items[dist.get_rank()::dist.get_world_size()]
    n = int(all_reduce([math.ceil(len(mine) / mb)], dist.ReduceOp.MAX)[0])
    sums: dict[str, float] = {}
    engine.eval()
    with torch.no_grad():
        for b in range(n):
            chunk = mine[b * mb:(b + 1) * mb]
            for k, v in fn(engine, _to(task.collate(chunk or items[:1]), engine.device)).items():
                sums[k] = sums.get(k, 0.0) + (float(v) if chunk else 0.0)
    engine.train()
    keys = sorted(sums)
    return dict(zip(keys, all_reduce([sums[k] for k in keys])))


def is_adapter(name: str) -> bool:
    """A LoRA adapter tensor of a peft model's state dict."""
    return ".lora_A." in name or ".lora_B." in name


def full_state_dict(engine, zero3: bool, master: bool = False, keep=None) -> dict | None:
    """The full (unpartitioned) state dict on rank 0, ``None`` elsewhere; call it on every rank.
    Under ZeRO-3 the parameters are gathered one module at a time, copied, and released. With
    ``master`` (bf16 training) the optimizer's fp32 master weights are taken instead of the bf16
    copies the model computes with: updates smaller than bf16's resolution live only there.
    ``keep(name)``: only those parameters (no buffers), e.g. ``is_adapter`` — nothing else is
    gathered or copied."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank, sd = dist.get_rank(), {}
    if not zero3 and not master:
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()
                if keep is None or keep(k)} if rank == 0 else None
    masters = _plain_masters(engine) if master else {}

    def visit(module, prefix: str) -> None:
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if keep is None or keep(prefix + n)]
        with deepspeed.zero.GatheredParameters([p for _, p in own] if zero3 else [], modifier_rank=None):
            for name, p in own:
                full = safe_get_full_fp32_param(p) if master else None  # collective: every rank calls it
                full = masters.get(id(p)) if full is None else full
                if rank == 0:
                    kept = full if full is not None else (p.float() if master else p)  # frozen: no master
                    sd[prefix + name] = kept.detach().cpu().clone()
            if rank == 0 and keep is None:
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
    base = {key.replace("base_model.model.", "", 1).replace(".base_layer.", "."): value
            for key, value in sd.items() if not is_adapter(key)}
    return {**base, **merge_adapters(base, {k: v for k, v in sd.items() if is_adapter(k)}, scale)}


def merge_adapters(base: dict, adapters: dict, scale: float) -> dict:
    """The weights LoRA ``adapters`` (a peft state dict's ``lora_A``/``lora_B`` tensors) change, as
    plain weights ``W + scale · B @ A`` over ``base`` (plain names: ``model.layers.0.self_attn.q_proj.weight``)."""
    out = {}
    for key, a in adapters.items():
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.", 1)[0]
        b = adapters[key.replace(".lora_A.", ".lora_B.")]
        name = prefix.replace("base_model.model.", "", 1) + ".weight"
        w = base[name]
        out[name] = w + scale * (b.float() @ a.float()).to(w.dtype)
    return out


def load_lm(spec: str, cfg):
    """The starting causal LM in fp32 on CPU (DeepSpeed moves and casts it), with gradient
    checkpointing and LoRA adapters when configured."""
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


def fit(task: Task, spec: JobSpec, ws: WorkerSettings) -> None:
    """The shared train loop (see the module docstring)."""
    import deepspeed

    cfg = spec.cfg
    mb, ga, world = cfg.micro_batch_size, cfg.grad_accum, ws.world_size
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
        config=deepspeed_config(cfg, ws.precision),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total)))
    started, lengths = time.time(), [len(x) for x in task.train]
    state = checkpoints.restore(engine, {"step": 0, "history": [], "resumes": 0, "resumed_from": []},
                               spec.stage_dir, spec.job)
    marker = spec.path(FAULT_MARKER)
    progress = ProgressFile(spec, ws.rank, total, "steps")
    engine.train()
    while state["step"] < total:
        epoch, first = divmod(state["step"], steps_per_epoch)
        batches = length_grouped_batches(lengths, mb, spec.seed * 100_003 + epoch, cfg.group_by_length)
        for s in range(first, min(steps_per_epoch, first + total - state["step"])):
            if cfg.fail_at_step == state["step"] + 1 and ws.rank == 0 and not storage.exists(marker):
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
            *sums, tokens = all_reduce([acc[k] for k in sorted(acc)] + [ntok])
            rec = dict(zip(sorted(acc), (v / world for v in sums)))
            state["step"] += 1
            rec.update(step=state["step"], epoch=epoch, lr=lr, tokens=int(tokens), seconds=round(time.time() - t0, 4))
            if engine.get_global_grad_norm() is not None:
                rec["grad_norm"] = float(engine.get_global_grad_norm())
            if task.eval and cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total:
                rec.update(task.summarize(evaluate(engine, task, task.eval, task.evaluate, mb)))
            state["history"].append(rec)
            progress(state["step"])
            if ws.rank == 0:
                # straight to the process's stdout: Ray Train's patched print would log the line twice
                print(f"[{spec.job}] step {state['step']}/{total} loss {rec['loss']:.4f} lr {lr:.2e}",
                      file=sys.__stdout__, flush=True)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < total:
                checkpoints.save(engine, state, rec)
    _finish(engine, task, spec, ws, state, total, time.time() - started)


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


def _finish(engine, task: Task, spec: JobSpec, ws: WorkerSettings, state: dict, total: int, seconds: float) -> None:
    """Final eval and probe, ``finalize``, then ``finish``."""
    final = (task.summarize(evaluate(engine, task, task.eval, task.evaluate, spec.cfg.micro_batch_size))
             if task.eval else {})
    hist = state["history"]
    if final and hist:
        hist[-1].update(final)
    probe_items = (task.eval or task.train)[:4]  # outputs before saving, to compare with the export
    engine.eval()
    with torch.no_grad():
        probe = task.probe(engine, _to(task.collate(probe_items), engine.device))
    engine.train()
    extra = task.finalize(engine, task) if task.finalize else {}
    finish(engine, spec, ws, hist, lambda sd, d: task.export(sd, d, engine.module, extra), spec.job,
           head={"steps": state["step"], "total_steps": total},
           tail={"final_loss": hist[-1]["loss"] if hist else None, "eval": final, "probe": probe,
                 "probe_ids": [x.id for x in probe_items], "rows": task.counts, "resumes": state["resumes"],
                 "resumed_from_steps": state["resumed_from"], "train_seconds": round(seconds, 2), **extra},
           metrics={"step": state["step"], **final})


def finish(engine, spec: JobSpec, ws: WorkerSettings, history: list[dict], export: Callable[[dict, str], None],
           title: str, head: dict, tail: dict, metrics: dict) -> None:
    """Every job's end, on every rank: the full weights gathered (the fp32 masters under bf16),
    then rank 0 writes the model (``export(state_dict, local_dir)``), ``metrics.jsonl`` and
    ``loss.png`` (``write_outputs``), and last ``train_summary.json``: ``job``, the job's ``head``
    (its progress), how it ran (``WorkerSettings.summary``), ``model_dir``, then its ``tail``
    (results). ``metrics`` is the final ``ray.train.report``."""
    import ray.train

    sd = full_state_dict(engine, spec.cfg.zero_stage == 3, master=ws.precision == "bf16")
    if ws.rank == 0:
        out = write_outputs(spec.stage_dir, spec.cfg.output, lambda d: export(sd, d), history, title)
        storage.write_json(spec.path(SUMMARY_FILE), {"job": spec.job, **head, **ws.summary(spec.cfg),
                                                     "model_dir": out, **tail})
    dist.barrier()
    ray.train.report(metrics)
