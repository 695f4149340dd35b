"""Connecting the driver to Ray: a local single-node cluster, or an existing one."""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from cluster import local, upload
from workflows.core import console

REPO_ROOT = Path(__file__).resolve().parent.parent
# Variables the workers need to see the same storage and offline settings as the driver.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
            "HF_HUB_OFFLINE", "HF_HOME", "CAI_LOG_LEVEL", "CAI_RAY_CACHE", "CAI_RAY_CPU_BF16",
            "CAI_ALLOW_RECIPE_CODE")


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
# DeepSpeed's ZeRO-1/2 gathers with a torch call torch now calls deprecated: a FutureWarning in the
# console of every training job, about code that is not ours and needs no action from the user.
QUIET_WARNINGS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",)

# Log lines that are notices, not problems: (logger, the message's start). DeepSpeed logs at WARNING
# level, on every import in every training worker of a machine without a GPU, that it chose the CPU
# accelerator — which is what we asked for.
QUIET_LOG_LINES = (("DeepSpeed", "Setting accelerator to CPU"),)


class _DropLines(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# Ray Train starts a preemption watcher actor (one more worker process) per training job, to
# follow nodes a cloud provider drains. A local cluster is this one machine: nothing to watch.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def use_local_defaults() -> None:
    """Driver settings for a cluster of this machine alone (Ray Train reads them from the driver's
    environment); a value the user set wins."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def quiet_libraries() -> None:
    """The library messages above, dropped by exact logger and message (each with its reason)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, start in QUIET_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.start == start for f in logger.filters):
            logger.addFilter(_DropLines(start))


def quiet_worker_logs() -> None:
    """Runs at the start of every Ray worker process (``worker_process_setup_hook``). Also points
    Ray's own API clients in the worker at this cluster: without an address they look for one on
    the machine, and with two clusters on it (two runs, a run beside `ray start`) Ray Train's
    placement-group cleaner died with "Found multiple active Ray instances" and a traceback."""
    import ray

    quiet_libraries()
    if "RAY_ADDRESS" not in os.environ:
        try:
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 — not connected yet: Ray finds the address itself
            pass


def job_runtime_env() -> dict | None:
    """The runtime env of the Ray job this process is the driver of (``ray job submit``, ``cai submit``,
    a KubeRay RayJob), or None outside a job. Ray hands it to the entrypoint in an environment variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env(ours: dict, job: dict | None) -> dict:
    """What ``ray.init`` may add to the job's own runtime env: only the fields and environment
    variables the job does not set already (Ray refuses to merge a conflict), and never a
    ``working_dir`` — a job's code is the job's working_dir, or installed on the cluster."""
    if job is None:
        return ours
    added = {k: v for k, v in ours.items() if k not in job and k not in ("env_vars", "working_dir", "excludes")}
    job_vars = job.get("env_vars") or {}
    env_vars = {k: v for k, v in (ours.get("env_vars") or {}).items() if k not in job_vars and k not in os.environ}
    if env_vars:
        added["env_vars"] = env_vars
    return added


def init_args(cfg: RayConfig) -> dict:
    """The ``ray.init`` arguments for ``cfg``. Inside a Ray job the driver always joins the job's
    cluster, whatever ``address`` says, and keeps the job's runtime env."""
    runtime_env: dict = {"env_vars": worker_env(), "worker_process_setup_hook": "cluster.connect.quiet_worker_logs"}
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    job = job_runtime_env()
    if job is not None:
        runtime_env = driver_runtime_env(runtime_env, job)  # RAY_ADDRESS (set by Ray) says where
    elif cfg.address in ("local", "", None):
        # No dashboard and no metrics agent on a laptop/CI node: the local cluster starts faster, nothing
        # listens for HTTP, and the metrics exporter thread (a known source of segfaults in exiting Ray
        # workers) never runs. address="local": always a new cluster — with no address Ray would join
        # any cluster already running on this machine (another run's, a `ray start` one) and share its
        # Serve and resources.
        # dashboard_port=0: with no dashboard Ray still records 127.0.0.1:8265 as this cluster's state
        # API, and Ray Train's placement-group cleaner asks it once a second whether the job's
        # controller lives. Another cluster's dashboard on the default port answers "no such actor",
        # and the cleaner removes the running job's placement group (its workers die, a restart is
        # spent). Nothing listens on port 0, so that ask fails and is retried.
        kwargs.update(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, dashboard_port=0,
                      _system_config=LOCAL_SYSTEM_CONFIG)
    else:
        # Ship the project so the top-level packages import on every node with no install step: the
        # files `cai submit` would upload (never secrets, never links out of the project), staged apart.
        runtime_env["working_dir"] = staged_project()
        kwargs["address"] = cfg.address
    return {**kwargs, "runtime_env": runtime_env}


_STAGED: dict[str, str] = {}


def staged_project() -> str:
    """This checkout's files as ``cai submit`` selects them, copied once per process into a temporary
    directory (removed at exit): what ``ray.init`` uploads as the working_dir of a remote cluster."""
    if "dir" not in _STAGED:
        sel = upload.select(REPO_ROOT)
        upload.check_size(sel)
        if sel.left_out:
            logging.getLogger(__name__).warning(sel.left_out_line())
        tmp = tempfile.mkdtemp(prefix="cai-project-")
        atexit.register(shutil.rmtree, tmp, True)
        _STAGED["dir"] = str(upload.stage(sel, tmp))
    return _STAGED["dir"]


def use_data_defaults() -> None:
    """Ray Data settings for this driver. Parquet is read by Ray's classic reader: the newer one
    (the default since Ray 2.5x) starts a pool of footer-reading actors for every read, a worker
    process each — on a 2-core machine a read of a stage's few input files took 2.4–3.3 s with it
    and 0.4–0.8 s without (``benchmarks/read_overhead.py``), and a run makes a read per engine pool."""
    import ray

    ray.data.DataContext.get_current().use_datasource_v2 = False


def connect(cfg: RayConfig | None = None, run_dir: str | None = None) -> None:
    """Start or join Ray once per process (``init_args``); a second call is a no-op. A local cluster
    starts only once a fresh interpreter imports our packages as this one does, gets a temp dir of its
    own, and — for a run directory — first ends what a killed earlier driver of that run left
    (``cluster.local``)."""
    import ray

    cfg = cfg or RayConfig()
    quiet_libraries()  # the driver's own imports too
    use_data_defaults()  # also for a program that started Ray itself before calling us
    if ray.is_initialized():
        return
    args = init_args(cfg)
    temp = None
    if args.get("address") == "local":
        use_local_defaults()
        problem = local.worker_import_problem()
        if problem:
            raise local.LocalClusterError(problem)
        if run_dir:
            local.end_leftovers(run_dir, log=console.say)
        temp = args["_temp_dir"] = local.new_temp_dir()
        atexit.register(local.forget, run_dir)
    ray.init(**args)
    if temp and run_dir:
        local.record(run_dir, temp)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress_bars
