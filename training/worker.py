"""What a Ray Train worker is given and what it works out for itself (docs/training.md).

The driver hands every worker one :class:`JobSpec` through Ray Train's ``train_loop_config``:
the job's typed config as itself (``SFTConfig``, ``RewardConfig``, ``DPOConfig``, ``PPOConfig``),
the stage directory, the seed, the starting model and the job's own inputs. ``setup_worker``
then derives what only a worker can know — its rank, the world size, its device and the
precision every rank agreed on — as a :class:`WorkerSettings`. The settings derived from the
config (the precision rule, DeepSpeed's config, the lr schedule) are here too: only workers use them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from actors.precision import DtypeChoice, choose_dtype
from training.config import TrainConfig
from training.data import tokenize_rows
from workflows.core import storage

# What a job leaves in its stage directory besides the model and Ray's own files.
SUMMARY_FILE, METRICS_FILE, CURVES_FILE = "train_summary.json", "metrics.jsonl", "loss.png"
PROGRESS_FILE = "_progress.json"  # rank 0's steps done, for the driver's progress line
FAULT_MARKER = "_fault_injected"


@dataclass(frozen=True)
class JobSpec:
    """One training job, as every worker receives it. ``inputs`` is the job's own: :class:`RowRefs`
    for sft/reward/dpo, the prompts and reward model for ppo."""

    job: str  # sft, reward, dpo or ppo: Ray's run name and the summary's "job"
    cfg: TrainConfig  # the job's typed config
    stage_dir: str  # absolute, or a remote URI
    seed: int
    model: str  # the starting model, resolved (and converted from GGUF) on the driver
    inputs: Any = None

    def path(self, name: str) -> str:
        return storage.join(self.stage_dir, name)


@dataclass(frozen=True)
class RowRefs:
    """The rows of a supervised job: object-store references to pyarrow tables. ``train`` is None
    where the train rows arrive as this worker's split of a Ray Dataset; ``eval`` None without
    held-out rows."""

    id_col: str
    train: Any = None
    eval: Any = None


@dataclass(frozen=True)
class WorkerSettings:
    """What ``setup_worker`` derived on this worker."""

    rank: int
    world_size: int
    device: torch.device
    precision: str  # "bf16" or "fp32", the same on every rank
    precision_reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def summary(self, cfg: TrainConfig) -> dict:
        """The fields of ``train_summary.json`` that say how the job ran."""
        return {"world_size": self.world_size, "zero_stage": cfg.zero_stage, "precision": self.precision,
                "precision_reason": self.precision_reason}


def setup_worker(spec: JobSpec) -> WorkerSettings:
    """Threads for CPU workers, one seed on every rank (ZeRO-3 partitions each rank's own copy
    of the freshly built model, so new weights must agree), and DeepSpeed on the process group
    Ray Train already made; then the precision all ranks agree on."""
    import deepspeed
    import ray.train.torch

    cfg = spec.cfg
    torch.manual_seed(spec.seed)
    if cfg.gpus_per_worker == 0:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    else:
        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing group, no re-init
    precision, reason = agree_precision(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.gpus_per_worker else torch.device("cpu")
    return WorkerSettings(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                          precision=precision, precision_reason=reason)


def choose_precision(cfg: TrainConfig, native_bf16: bool | None = None, cuda_bf16: bool | None = None) -> DtypeChoice:
    """The training precision as a :class:`~actors.precision.DtypeChoice`, by the engines' rule:
    ``auto`` → bf16 on GPUs that have it; on CPU workers bf16 only where the processor computes it
    natively, fp32 otherwise (a GPU without bf16 trains in fp32). Runs on the workers, whose
    processors decide; ``native_bf16``/``cuda_bf16`` fake either answer in tests."""
    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    requested = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[cfg.precision]
    choice = choose_dtype(requested, device, native_bf16=native_bf16, cuda_bf16=cuda_bf16,
                          setting="training precision")
    if choice.dtype == torch.float16:  # DeepSpeed fp16 needs loss scaling we do not configure
        return DtypeChoice(torch.float32, "auto: CUDA GPU without bfloat16, so float32")
    return choice


def agree_precision(cfg: TrainConfig) -> tuple[str, str]:
    """Every rank picks its precision on its own processor (``choose_precision``); all ranks
    must train in the same one, so where they differ (mixed CPUs) all fall back to fp32."""
    choice = choose_precision(cfg)
    picks = [None] * dist.get_world_size()
    dist.all_gather_object(picks, (choice.short, choice.reason))
    if len({p[0] for p in picks}) == 1:
        return choice.short, choice.reason
    return "fp32", "workers disagree on native bfloat16 (mixed processors), so fp32 on all"


def deepspeed_config(cfg: TrainConfig, precision: str) -> dict:
    """DeepSpeed's config dict. The optimizer is torch's AdamW (``torch_adam``): nothing to
    compile, and it runs on CPU and GPU alike."""
    ds = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
          "zero_optimization": {"stage": cfg.zero_stage}, "bf16": {"enabled": precision == "bf16"},
          "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                    "weight_decay": cfg.weight_decay, "torch_adam": True}},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if cfg.max_grad_norm > 0:
        ds["gradient_clipping"] = cfg.max_grad_norm
    return ds


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr for optimizer step ``s`` (0-based): linear warmup to 1 over
    ``warmup`` steps, then cosine/linear decay towards 0 at ``total`` (or constant)."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if schedule == "linear" else 1.0
    return f


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over all ranks (sum by default), in float64."""
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def load_items(tokenize: Callable, tok, spec: JobSpec) -> tuple[list, list, dict]:
    """Tokenize this worker's train shard (sorted by id) and all held-out rows; trim every shard
    to the smallest kept count (ranks must take equal steps). Returns items and summed counts."""
    import ray
    import ray.train

    rows_in: RowRefs = spec.inputs
    max_length = spec.cfg.max_length
    if rows_in.train is not None:  # every worker got all rows: each takes its own slice
        rows = sorted(ray.get(rows_in.train).to_pylist(), key=lambda r: str(r[rows_in.id_col]))
        rows = rows[dist.get_rank()::dist.get_world_size()]
    else:  # this worker's split of a Ray Dataset
        rows = []
        for table in ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow", batch_size=1024):
            rows += table.to_pylist()
        rows.sort(key=lambda r: str(r[rows_in.id_col]))
    train, counts = tokenize_rows(tokenize, tok, rows, max_length)
    held_out = ray.get(rows_in.eval).to_pylist() if rows_in.eval is not None else []
    evals, eval_counts = tokenize_rows(tokenize, tok, held_out, max_length)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"train_shards": len(rows), "kept": len(train), **counts})
    keep = min(c["kept"] for c in per_rank)
    total = {k: sum(c.get(k, 0) for c in per_rank) for k in sorted({k for c in per_rank for k in c})}
    total["unused_to_balance_workers"] = total.pop("kept") - keep * len(per_rank)
    total["trained"] = keep * len(per_rank)
    total.update({f"eval_{k}": v for k, v in eval_counts.items()})
    return train[:keep], evals, total


class ProgressFile:
    """Rank 0's progress — ``{"done", "total", "unit"}`` in ``<stage>/_progress.json`` — which the
    driver shows as the stage's progress line. Written at most every ``every_s`` seconds, and at
    the last step; other ranks write nothing."""

    def __init__(self, spec: "JobSpec", rank: int, total: int, unit: str, every_s: float = 2.0):
        self.uri, self.rank, self.total, self.unit, self.every_s = spec.path(PROGRESS_FILE), rank, total, unit, every_s
        self.clock = time.monotonic
        self.last = -every_s

    def __call__(self, done: int) -> None:
        now = self.clock()
        if self.rank != 0 or (done < self.total and now - self.last < self.every_s):
            return
        self.last = now
        storage.write_json(self.uri, {"done": done, "total": self.total, "unit": self.unit})
