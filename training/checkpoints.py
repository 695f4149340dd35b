"""Checkpoints of the training jobs: every ``checkpoint_every`` steps each rank writes its DeepSpeed
shard and rank 0 the train state (``STATE_FILE``), reported to Ray Train; a restarted worker group
(or the same command after a stop) resumes from the newest whole checkpoint on storage."""
from __future__ import annotations

import json
import os
import posixpath
import tempfile

import torch.distributed as dist

from workflows.core import storage

STATE_FILE = "trainer_state.json"


def save(engine, state: dict, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:  # every rank writes its own shard; Ray merges them
        engine.save_checkpoint(os.path.join(d, "deepspeed"), tag=f"step{state['step']}")
        if dist.get_rank() == 0:
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _complete(fs, d: str, names: set[str], tag: str) -> bool:
    """A DeepSpeed checkpoint ``tag`` under ``d`` whose files (``names``, relative) are all there and
    whole: the model states, an optimizer shard for every rank when the optimizer is sharded, and —
    on a local disk, where a killed writer leaves a file cut short — every ``.pt`` a readable zip
    archive (torch's format; its directory is written last). An S3 object is whole or absent."""
    import zipfile

    import pyarrow.fs as pafs

    files = {n.split("/", 2)[2] for n in names if n.startswith(f"deepspeed/{tag}/")}
    if not any(f.endswith("model_states.pt") for f in files):
        return False
    sharded = any("zero_pp_rank_" in f for f in files)
    if sharded and not all(any(f"zero_pp_rank_{r}_" in f for f in files) for r in range(dist.get_world_size())):
        return False
    if isinstance(fs, pafs.LocalFileSystem):
        for f in files:
            if f.endswith(".pt"):
                try:
                    zipfile.ZipFile(f"{d}/deepspeed/{tag}/{f}").close()
                except (zipfile.BadZipFile, OSError):
                    return False
    return True


def newest_checkpoint(stage_dir: str, job: str):
    """The newest complete checkpoint in the job's storage (``<stage_dir>/_ray/<job>/checkpoint_*``),
    registered with Ray Train or not: a worker killed right after saving one leaves it on disk,
    but Ray Train only learns of a checkpoint when its controller next polls that worker — so
    after such a kill it would restart from an older one, or from step 0. None if there is none."""
    import pyarrow.fs as pafs
    import ray.train

    fs, root = storage.resolve(storage.join(stage_dir, "_ray", job))
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    dirs = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(root))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    for d in dirs:
        names = {posixpath.relpath(i.path, d) for i in fs.get_file_info(pafs.FileSelector(d, recursive=True))
                 if i.type == pafs.FileType.File}
        if STATE_FILE not in names or "deepspeed/latest" not in names:
            continue
        with fs.open_input_stream(f"{d}/deepspeed/latest") as f:
            tag = f.read().decode().strip()
        if _complete(fs, d, names, tag):
            return ray.train.Checkpoint(path=d, filesystem=fs)
    return None


def restore(engine, state: dict, stage_dir: str, job: str) -> dict:
    """``state`` as the newest checkpoint left it (weights and optimizer loaded into ``engine``,
    ``resumes`` counted), or ``state`` itself where there is none."""
    import ray.train

    ckpt = newest_checkpoint(stage_dir, job) or ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        engine.load_checkpoint(os.path.join(d, "deepspeed"))
        with open(os.path.join(d, STATE_FILE)) as f:
            old = json.load(f)
    return {**old, "resumes": old["resumes"] + 1, "resumed_from": old["resumed_from"] + [old["step"]]}
