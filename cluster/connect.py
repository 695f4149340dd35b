"""Connecting the driver to Ray: a local single-node cluster, or an existing one."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Variables the workers need to see the same storage and offline settings as the driver.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
            "HF_HUB_OFFLINE", "HF_HOME", "CAI_LOG_LEVEL", "CAI_RAY_CACHE", "CAI_RAY_CPU_BF16")


@dataclass
class RayConfig:
    """``address``: ``local`` starts a single-node cluster in this process (laptop, CI);
    ``auto`` joins the cluster running on this machine; ``ray://HOST:10001`` connects a
    remote client. For batch jobs on a cluster prefer ``cai submit`` (Ray Jobs)."""

    address: str = "local"
    num_cpus: int | None = None  # local only: cap the CPUs Ray may use
    progress_bars: bool = True


def worker_env() -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
    return env


LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}

# Ray Train's placement-group cleaner asks the state API (served by the dashboard) once a
# second whether the train controller lives; without a dashboard every ask logs a warning.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Runs at the start of every Ray worker process (``worker_process_setup_hook``)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(cfg: RayConfig | None = None) -> None:
    """Start or join Ray once per process; a second call is a no-op."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    runtime_env: dict = {"env_vars": worker_env(), "worker_process_setup_hook": "cluster.connect.quiet_worker_logs"}
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.address in ("local", "", None):
        # No dashboard and no metrics agent on a laptop/CI node: the local cluster starts faster, and
        # the metrics exporter thread (a known source of segfaults in exiting Ray workers) never runs.
        kwargs.update(num_cpus=cfg.num_cpus, include_dashboard=False,
                      _system_config=LOCAL_SYSTEM_CONFIG)
    else:
        # Ship the repo so the top-level packages import on every node with no install step.
        runtime_env["working_dir"] = str(REPO_ROOT)
        runtime_env["excludes"] = ["runs/", ".git/", "**/__pycache__/", "*.parquet", "*.gguf"]
        kwargs["address"] = cfg.address
    ray.init(runtime_env=runtime_env, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress_bars
