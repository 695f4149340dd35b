"""Faults injected into real runs — `cai run` on a local Ray cluster with a tiny random Llama — each
checked for rows lost, rows duplicated and work redone. Prints one table row per fault and, last:

    faults survived N/N, rows lost 0, duplicates 0, work redone at most X%

A fault not survived prints ``NOT survived: --faults NAME``, each check it failed (exit code, rows lost,
no resume, ...) and its consoles' last 30 lines; names and reasons are repeated above the last line.

    python benchmarks/chaos.py [--faults actor_sl_cai,driver_kill,...] [--prompts 48] [--keep]

Faults (``FAULTS``):
- ``actor_sl_cai`` / ``actor_judging``: one engine actor killed (SIGKILL) mid-stage, in SL-CAI (also
  on vLLM: ``actor_vllm``) and in judging: Ray restarts it and retries its block; one copy per id kept.
- ``actor_starting``: as ``actor_sl_cai``, and first another engine actor killed while it still
  loads (an OOM kill at load, a node lost as the pool starts): Ray starts it again.
- ``driver_kill``: the driver killed (SIGKILL) mid-stage, its Ray processes ended, then the same
  command run again: finished stages skipped, the interrupted one redoes at most its in-flight blocks.
- ``torn_raw_file``: as ``driver_kill``, and one raw file the killed run left is cut in half before
  the rerun: set aside as ``*.unreadable``, counted in the summary, its rows redone.
- ``torn_cache_shard``: a label-cache file (a compacted run, else the oldest delta) cut in half, then
  the preference stage redone: the file is set aside and counted, its judgments made again.
- ``train_worker``, ``train_reward``, ``train_dpo``, ``train_ppo``: the Ray Train worker killed
  (SIGKILL) in SFT, reward, DPO and PPO the moment its first checkpoint is whole on storage (mid-step:
  a tiny model's steps take tens of milliseconds, so the kill waits on that event, not on a delay):
  the job restarts from its newest whole checkpoint (``max_failures``) and the loss curve goes on
  from there, one record per step (PPO: iteration).
- ``node_removed``: two ``ray start`` nodes, the run directory on a local S3 server, an engine actor
  per node; the second node killed whole once the first block is saved: the head finishes every row once.
- ``disk_full``: the run directory on a 64 KiB tmpfs (mounted for the fault; needs root) that fills
  up mid SL-CAI: exit 2, one error line, no ``_SUCCESS``; remounted bigger, the same command finishes.
- ``s3_flaky`` / ``s3_restart``: the run directory on a local S3 server behind a proxy answering 503
  SlowDown to a fifth of the requests, 50 ms late, or dropping every connection for 8 s from the first
  saved block on: retried with backoff, or one clear error and the same command goes on.
- ``serve_replica``: one of two ``cai serve`` replicas killed under load: the other keeps answering,
  only requests in flight on the killed one fail (rows here are requests).

How it measures (``benchmarks/chaos_harness.py``): every run's engines come from ``counting_engine``,
which logs each conversation it answers or judges; "redone" counts a row's conversations beyond one
attempt. Rows in, out and errors come from the stage's datasets; lost = inputs in neither,
duplicated = ids seen twice. Each run is its own process session: its Ray processes are found, and
ended, by session id, never by name.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.chaos_harness import (  # noqa: E402 — after the path insert
    LOG_ENV, ROOT, CaiRun, FlakyS3, attempts, audit, cache_files, console_tails, engine, failed_checks, free_port,
    head, ids, kill_driver_mid_stage, preference_stage, prompts_file, raw_files, redone, rows_in, sl_cai_recipe,
    started_engines, table, tear, tiny_model, wait_until, whole_checkpoint)


def fault_actor_sl_cai(work: Path, model: str, n: int, starting: bool = False, backend: str = "auto") -> dict:
    """One engine actor killed once the first block is saved; with ``starting``, first another one
    killed the moment its process appears, while it still loads."""
    prompts, texts = prompts_file(work, n)
    run = CaiRun(work, sl_cai_recipe(work, model, prompts, backend=backend))
    try:
        run.start()
        stage = work / "run" / "critique_revision"
        note, spared = "", set()
        if starting:
            first = wait_until(lambda: run.find("CritiqueReviseWorker"), 300, "an engine actor", run, every=0.02)[0]
            first.send_signal(signal.SIGKILL)
            spared.add(first.pid)
            note = (f"actor pid {first.pid} killed while starting (engine loaded: "
                    f"{first.pid in started_engines(run.log)}); ")
        victim = wait_until(lambda: [p for p in run.find("CritiqueReviseWorker") if p.pid not in spared], 300,
                            "an engine actor", run)[0]
        wait_until(lambda: raw_files(stage), 300, "the first raw file", run, every=0.05)
        victim.send_signal(signal.SIGKILL)  # mid-stage: the first block is saved, the rest are not
        rc = run.wait(600)
        counts = attempts(run.log, "g", set(texts))
        name = ("vLLM " if backend == "vllm" else "") + "engine actor killed (SL-CAI)"
        return audit(name + (", another while starting" if starting else ""), stage,
                     "sl_cai", "prompt_id", ids(work / "run" / "prompts" / "prompts", "prompt_id"), redone(counts),
                     {"exit 0": rc == 0},
                     note + f"actor pid {victim.pid} killed once the first block was saved" + run.failure(rc))
    finally:
        run.close()


def fault_actor_starting(work: Path, model: str, n: int) -> dict:
    return fault_actor_sl_cai(work, model, n, starting=True)


def fault_actor_vllm(work: Path, model: str, n: int) -> dict:  # heads of 32: vLLM's CPU attention has no 16
    return fault_actor_sl_cai(work, tiny_model(work / "vllm-model", head_dim=32), n, backend="vllm")


def fault_actor_judging(work: Path, model: str, n: int) -> dict:
    prompts, _ = prompts_file(work, n)
    recipe = head(work) + f"""  - stage: prompts
    path: {prompts}
{preference_stage(model)}"""
    run = CaiRun(work, recipe)
    try:
        run.start()
        judging = work / "run" / "preference" / "_judging"
        victim = wait_until(lambda: run.find("JudgeWorker"), 300, "a judge actor", run)[0]
        wait_until(lambda: raw_files(judging), 300, "the first judged block", run, every=0.05)
        victim.send_signal(signal.SIGKILL)
        rc = run.wait(600)
        pair_ids = ids(work / "run" / "preference" / "pairs", "pair_id")
        return audit("engine actor killed (judging)", judging, "labels", "pair_id",
                     pair_ids, redone(attempts(run.log, "j")), {"exit 0": rc == 0},
                     f"judge actor pid {victim.pid} killed" + run.failure(rc))
    finally:
        run.close()


def fault_driver_kill(work: Path, model: str, n: int, torn_file: bool = False) -> dict:
    prompts, texts = prompts_file(work, n)
    run = CaiRun(work, sl_cai_recipe(work, model, prompts))
    stage = work / "run" / "critique_revision"
    try:
        left = kill_driver_mid_stage(run, stage, min_files=2 if torn_file else 1)
        saved = len(ids(stage / "_raw", "prompt_id"))
        torn = ""
        if torn_file:
            victim = raw_files(stage)[0]
            tear(victim)
            torn = f"; tore {victim.name}"  # its rows were saved once: the rerun must find it unreadable, redo them
        run.start()
        rc = run.wait(600)
        console = run.text()  # the rerun's
        summary = (stage / "summary.md").read_text() if (stage / "summary.md").is_file() else ""
        repaired = "repaired: 1 unreadable file" in summary
        counts = attempts(run.log, "g", set(texts))
        name = "raw file torn, then rerun" if torn_file else "driver killed (SIGKILL), then rerun"
        note = (f"{saved} rows saved before the kill; still running 10 s after the driver died: {left or 'nothing'}"
                f"{torn}; resumed: {'resuming:' in console}"
                + (f"; summary counts the torn file: {repaired}" if torn_file else "") + run.failure(rc))
        checks = {"rerun exit 0": rc == 0, "rerun resumed (prints 'resuming:')": "resuming:" in console}
        if torn_file:
            checks["summary counts the torn file ('repaired: 1 unreadable file')"] = repaired
        return audit(name, stage, "sl_cai", "prompt_id",
                     ids(work / "run" / "prompts" / "prompts", "prompt_id"), redone(counts), checks, note)
    finally:
        run.close()


def fault_torn_raw_file(work: Path, model: str, n: int) -> dict:
    return fault_driver_kill(work, model, n, torn_file=True)


def fault_torn_cache_shard(work: Path, model: str, n: int) -> dict:
    """Fixed pairs (``pairs_from``), so that only the judge's cache decides what is judged again."""
    _, texts = prompts_file(work, n)
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": t, "response_a": f"I can't help with that ({i}).",
                                         "response_b": f"Sure, here is how ({i})."}) + "\n"
                             for i, t in enumerate(texts)))
    recipe = head(work) + f"""  - stage: preference
    pairs_from: {pairs}
    principles_per_pair: 1
    checkpoint_rows: 4
    engine_factory: benchmarks.chaos_harness:counting_engine
    judges: [{engine(model, concurrency=2, batch_size=2)}]
"""
    run = CaiRun(work, recipe)
    try:
        run.start()
        first = run.wait(600)
        judged = sum(attempts(run.log, "j").values())
        shards = cache_files(work / "run" / "label_cache")  # the files a reader reads: runs, then deltas
        victim, kept = shards[0], sum(rows_in(f) for f in shards[1:])
        tear(victim)
        run.log.unlink()
        run.start("--restart-from", "preference")
        rc = run.wait(600)
        again = sum(attempts(run.log, "j").values())
        summary = (work / "run" / "preference" / "summary.md").read_text()
        repaired = "repaired: 1 unreadable file" in summary
        pair_ids = ids(work / "run" / "preference" / "pairs", "pair_id")
        return audit("label-cache shard torn, stage redone", work / "run" / "preference" / "_judging", "labels",
                     "pair_id", pair_ids, again,
                     {"first run exit 0": first == 0, "rerun exit 0": rc == 0,
                      "summary counts the torn shard ('repaired: 1 unreadable file')": repaired,
                      "only the torn shard's judgments made again": again == judged - kept},
                     f"{len(shards)} shards, 1 torn; {judged} judgments in the first run, {again} made again "
                     f"(the torn shard's {judged - kept}); summary counts it: {repaired}")
    finally:
        run.close()


def _train_recipe(work: Path, model: str, n: int, job: str) -> str:
    """A recipe ending in the training job ``job``: a run of 24 optimizer steps (12 PPO iterations),
    one worker, a checkpoint every 4, two failures allowed."""
    train = f"""    model: {model}
    num_workers: 1
    checkpoint_every: 4
    max_failures: 2
"""
    if job == "sft":
        prompts, _ = prompts_file(work, n)
        return sl_cai_recipe(work, model, prompts, tokens=12, extra=f"""  - stage: sft
{train}    micro_batch_size: 1
    max_steps: 24
    epochs: 3
    eval_fraction: 0.0
""")
    if job == "ppo":  # a programmatic reward: no reward model to train first
        prompts, _ = prompts_file(work, n)
        return head(work) + f"""  - stage: prompts
    path: {prompts}
  - stage: ppo
{train}    reward_fn: benchmarks.chaos_harness:short_answer_reward
    iterations: 12
    prompts_per_iteration: 2
    samples_per_prompt: 2
    max_new_tokens: 6
    micro_batch_size: 2
    max_length: 256
    rollout: {{batch_size: 4, torch_threads: 1}}
"""
    pairs = work / "pairs.jsonl"  # fixed pairs, judged once by the tiny judge
    pairs.write_text("".join(json.dumps({"prompt": t, "response_a": f"I can't help with that ({i}).",
                                         "response_b": f"Sure, here is how ({i})."}) + "\n"
                             for i, t in enumerate(prompts_file(work, n)[1])))
    return head(work) + f"""  - stage: preference
    pairs_from: {pairs}
    principles_per_pair: 1
    judges: [{engine(model, concurrency=1, batch_size=4)}]
  - stage: {job}
    input: preferences
{train}    micro_batch_size: 1
    max_steps: 24
    epochs: 3
    max_length: 128
    eval_fraction: 0.0
"""


def fault_train_worker(work: Path, model: str, n: int, job: str = "sft") -> dict:
    """The Ray Train worker SIGKILLed the moment its first checkpoint is whole (mid-step): the job
    restarts (within ``max_failures``) from its newest whole checkpoint, and the loss curve goes on
    from there with one record per step (rows here are optimizer steps, or PPO iterations)."""
    run = CaiRun(work, _train_recipe(work, model, n, job))
    stage = work / "run" / job
    unit = "iteration" if job == "ppo" else "step"
    try:
        run.start()
        # the worker is found while it starts, so the kill below costs no search of the process table
        workers = wait_until(lambda: run.find("RayTrainWorker"), 900, "the train worker", run)
        # the kill goes the moment the first checkpoint is whole: steps of a tiny model take tens of
        # milliseconds, and a kill that waits longer may come after the last step (no fault at all)
        at = wait_until(lambda: whole_checkpoint(stage), 900, f"the first whole {job} checkpoint", run, every=0.02)
        seen = time.time()
        victims = [v for v in workers if v.is_running()] or run.find("RayTrainWorker")
        for v in victims:
            v.send_signal(signal.SIGKILL)
        lag = time.time() - seen
        rc = run.wait(900)
        info = json.loads((stage / "_SUCCESS").read_text()) if (stage / "_SUCCESS").is_file() else {}
        training = info.get("training", {})
        hist = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()] \
            if (stage / "metrics.jsonl").is_file() else []
        steps = [h[unit] for h in hist]
        total = training.get("iterations" if job == "ppo" else "total_steps", 0)
        printed = [line for line in run.console().splitlines() if f"[{job}] {unit} " in line]
        curve_ok = bool(total) and steps == list(range(1, total + 1))
        resumed = training.get(f"resumed_from_{unit}s")
        checks = {"exit 0": rc == 0, f"loss curve {unit}s 1..{total or 'N'} once each": curve_ok,
                  "the job resumed from a checkpoint (resumes >= 1)": training.get("resumes", 0) >= 1}
        return {"fault": f"train worker killed mid-{unit} ({job.upper()})", "in": total, "out": len(steps),
                "errors": 0, "lost": total - len(set(steps)), "duplicated": len(steps) - len(set(steps)),
                "redone": max(0, len(printed) - total), "finished": all(checks.values()), "checks": checks,
                "note": f"worker pid(s) {[v.pid for v in victims]} killed {lag:.2f} s after the {unit} {at} "
                        f"checkpoint was seen whole; resumes {training.get('resumes')}, from {unit}s {resumed}; "
                        f"loss curve {unit}s 1..{total} once each: {curve_ok} (rows here are {unit}s); exit {rc}"}
    finally:
        run.close()


def fault_train_reward(work: Path, model: str, n: int) -> dict:
    return fault_train_worker(work, model, n, "reward")


def fault_train_dpo(work: Path, model: str, n: int) -> dict:
    return fault_train_worker(work, model, n, "dpo")


def fault_train_ppo(work: Path, model: str, n: int) -> dict:
    return fault_train_worker(work, model, n, "ppo")


def fault_disk_full(work: Path, model: str, n: int) -> dict:
    """The run directory on a small tmpfs (mounted here: needs root) that fills up during SL-CAI:
    exit 2 with one error line, no ``_SUCCESS`` over partial data; grown (remount), the same
    command finishes with every row once."""
    mnt = work / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        return {"fault": "disk full", "in": n, "out": "-", "errors": "-", "lost": "-", "duplicated": "-",
                "redone": "-", "finished": None, "note": "skipped: mounting a small filesystem needs root"}
    prompts, texts = prompts_file(work, n)
    run = CaiRun(work, sl_cai_recipe(mnt, model, prompts))
    stage = mnt / "run" / "critique_revision"
    try:
        run.start()
        first = run.wait(600)
        lines = [x for x in run.text().splitlines() if x.strip()]
        saved = len(ids(stage / "_raw", "prompt_id"))
        last = lines[-1] if lines else ""
        refused = {"first run exit 2": first == 2,
                   "first run's last line 'error: no space left ...'": last.startswith("error: no space left"),
                   "first run wrote no _SUCCESS": not (stage / "_SUCCESS").exists()}
        tracebacks = run.text().count("Traceback")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        run.start()
        rc = run.wait(600)
        return audit("disk full, then grown and rerun", stage, "sl_cai", "prompt_id",
                     ids(mnt / "run" / "prompts" / "prompts", "prompt_id"), redone(attempts(run.log, "g", set(texts))),
                     {**refused, "rerun exit 0": rc == 0},
                     f"first run: exit {first}, last line {last[:90]!r}, {saved} rows saved, "
                                          f"{tracebacks} traceback(s) in the console (Ray's task logs)")
    finally:
        run.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _s3_run(work: Path, model: str, n: int, s3: FlakyS3, name: str, during=None) -> dict:
    """SL-CAI with its run directory on ``s3``; ``during(run, raw)`` acts once the stage has started
    (``raw``: the URI of its raw blocks) and returns checks of its own. A run that stops with an error
    is run again (resumable); every row must end up once."""
    prompts, texts = prompts_file(work, n)
    uri = f"s3://cai/runs/{work.name}"
    recipe = sl_cai_recipe(work, model, prompts).replace(f"run_dir: {work}/run", f"run_dir: {uri}")
    run = CaiRun(work, recipe)
    os.environ.update(s3.env)  # CaiRun passes this process's environment on
    checks: dict[str, bool] = {}
    try:
        run.start()
        if during is not None:
            wait_until(lambda: run.find("CritiqueReviseWorker"), 300, "the engine actors", run)
            checks.update(during(run, f"{uri}/critique_revision/_raw"))
        codes = [run.wait(900)]
        while codes[-1] != 0 and len(codes) < 3:  # a clear error leaves the run resumable: go on
            run.start()
            codes.append(run.wait(900))
        console = run.console()
        errors = [x for x in console.splitlines() if x.startswith("error: ")]
        out, err = s3.ids(f"{uri}/critique_revision/sl_cai", "prompt_id"), s3.ids(f"{uri}/critique_revision/errors", "id")
        kept = collections.Counter(out + err)
        input_ids = s3.ids(f"{uri}/prompts/prompts", "prompt_id")
        return {"fault": name, "in": len(input_ids), "out": len(out), "errors": len(err),
                "lost": len(set(input_ids) - set(kept)), "duplicated": sum(c - 1 for c in kept.values() if c > 1),
                "redone": redone(attempts(run.log, "g", set(texts))), "finished": codes[-1] == 0,
                "checks": {**checks, "exit 0 within 3 runs of the same command": codes[-1] == 0},
                "note": f"exit codes {codes}; proxy: {dict(s3.counts)}; error lines: {errors[:2] or 'none'}"}
    finally:
        for k in s3.env:
            os.environ.pop(k, None)
        run.close()


def fault_s3_flaky(work: Path, model: str, n: int) -> dict:
    s3 = FlakyS3(fail_share=0.2, delay_s=0.05)
    try:
        return _s3_run(work, model, n, s3, "S3 answers 503 to 20% of requests, 50 ms slow")
    finally:
        s3.close()


def fault_s3_restart(work: Path, model: str, n: int) -> dict:
    s3 = FlakyS3()

    def outage(run: CaiRun, raw: str) -> dict:
        """Once the stage saves blocks (the engines loaded, rows in flight), the server goes away for
        8 s and until it has turned requests away: an outage that no request meets injects nothing (as
        one that began while the engines still loaded did: no S3 traffic then)."""
        wait_until(lambda: s3.files(raw), 300, "the first saved block", run, every=0.05)
        s3.down, began = True, time.time()
        try:
            wait_until(lambda: (time.time() - began >= 8 and s3.counts["dropped"]) or run.proc.poll() is not None,
                       300, "a request to meet the S3 outage", every=0.1)
        finally:
            s3.down = False
        return {"the outage met requests (some dropped)": s3.counts["dropped"] > 0}

    try:
        return _s3_run(work, model, n, s3, "S3 server down for 8 s mid-stage", during=outage)
    finally:
        s3.close()


def fault_node_removed(work: Path, model: str, n: int) -> dict:
    """A two-node cluster on this machine (``ray start --head`` and one more node, each its own process
    session), the run directory on a local S3 server, one engine actor per node. Once SL-CAI saved its
    first block, the second node goes away at once (every process of its session SIGKILLed, as a
    machine losing power): the pool finishes on the head, every row once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_cluster import LocalCluster

    prompts, texts = prompts_file(work, n)
    s3 = FlakyS3()
    log = work / "engine_calls.jsonl"
    # the nodes' workers get the storage, the call log and the factory switch from the nodes' environment
    cluster = LocalCluster(num_cpus=2, env={**s3.env, LOG_ENV: str(log), "CAI_ALLOW_RECIPE_CODE": "1",
                                            "RAY_health_check_period_ms": "1000"})
    uri = f"s3://cai/runs/{work.name}"
    try:
        cluster.add_node(num_cpus=2)
        recipe = (sl_cai_recipe(work, model, prompts, checkpoint_rows=2)
                  .replace(f"run_dir: {work}/run", f"run_dir: {uri}")
                  .replace("ray: {num_cpus: 2, ", f"ray: {{address: '{cluster.gcs}', "))
        run = CaiRun(work, recipe)
        os.environ.update(s3.env)
        try:
            run.start()
            raw = f"{uri}/critique_revision/_raw"
            wait_until(lambda: s3.files(raw), 300, "the first saved block", run, every=0.05)
            saved = len(s3.files(raw))
            killed = cluster.remove_node(1)
            rc = run.wait(900)
        finally:
            for k in s3.env:
                os.environ.pop(k, None)
            run.close()
        out = s3.ids(f"{uri}/critique_revision/sl_cai", "prompt_id")
        err = s3.ids(f"{uri}/critique_revision/errors", "id")
        kept = collections.Counter(out + err)
        input_ids = s3.ids(f"{uri}/prompts/prompts", "prompt_id")
        return {"fault": "worker node removed mid-stage (S3 run dir)", "in": len(input_ids), "out": len(out),
                "errors": len(err), "lost": len(set(input_ids) - set(kept)),
                "duplicated": sum(c - 1 for c in kept.values() if c > 1),
                "redone": redone(attempts(log, "g", set(texts))), "finished": rc == 0,
                "checks": {"exit 0": rc == 0},
                "note": f"{saved} block(s) saved when the second node's {killed} processes were killed; exit {rc}"}
    finally:
        cluster.stop()
        s3.close()


def _ask(url: str, i: int, timeout: float = 120) -> bool:
    """One chat completion; True if answered."""
    import urllib.request

    body = json.dumps({"model": "tiny", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Count to {i}."}]}).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return bool(json.loads(r.read())["choices"][0]["message"]["content"] is not None)
    except Exception:  # noqa: BLE001 — a refused, reset or failed request is the client's error here
        return False


def fault_serve_replica(work: Path, model: str, n: int, clients: int = 4) -> dict:
    """``cai serve`` with two replicas answering ``clients`` concurrent clients; one replica process
    SIGKILLed once a few requests were answered. The other keeps answering, Serve starts a new one;
    only requests in flight on the killed replica fail (clients do not retry)."""
    import concurrent.futures as cf
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    run = CaiRun(work, "")
    try:
        run.launch("serve", model, "--model-name", "tiny", "--replicas", "2", "--port", str(port),
                   "--max-model-len", "256", "--max-batch-size", "2")

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    return True
            except Exception:  # noqa: BLE001 — not up yet
                return False

        wait_until(up, 300, "cai serve to answer", run, every=1.0)
        wait_until(lambda: len(run.find("ServeReplica:cai")) >= 2, 120, "two replicas", run)
        results: list[tuple[float, float, bool]] = []
        killed: dict = {}
        lock = threading.Lock()

        def client(c: int) -> None:
            for i in range(c, n, clients):
                t0 = time.time()
                ok = _ask(url, i)
                with lock:
                    results.append((t0, time.time(), ok))
                    if len(results) >= 2 * clients and not killed:  # a few answered: kill one replica
                        victim = run.find("ServeReplica:cai")[0]
                        killed.update(pid=victim.pid, at=time.time())
                        victim.send_signal(signal.SIGKILL)

        with cf.ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        failed = [r for r in results if not r[2]]
        in_flight = [r for r in results if r[0] <= killed.get("at", 0) <= r[1]]
        after = [r for r in results if r[0] > killed.get("at", 0) + 1]
        ok = len(results) - len(failed)
        checks = {"a replica was killed": bool(killed),
                  "no more requests failed than were in flight at the kill": len(failed) <= len(in_flight),
                  "every request sent over 1 s after the kill answered": all(r[2] for r in after),
                  "cai serve still answers at the end": up()}
        return {"fault": "serve replica killed under load", "in": n, "out": ok, "errors": len(failed),
                "lost": n - len(results), "duplicated": 0, "redone": 0, "finished": all(checks.values()),
                "checks": checks,
                "note": f"{clients} clients, 2 replicas; replica pid {killed.get('pid')} killed; {len(in_flight)} "
                        f"request(s) in flight then, {len(failed)} failed (sent at "
                        f"{[round(r[0] - killed.get('at', 0), 2) for r in failed]} s from the kill, answered at "
                        f"{[round(r[1] - killed.get('at', 0), 2) for r in failed]} s); {len(after)} sent later, "
                        f"all answered: {all(r[2] for r in after)}"}
    finally:
        if run.proc is not None and run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGINT)
            try:
                run.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        run.close()


FAULTS = {"actor_sl_cai": fault_actor_sl_cai, "actor_starting": fault_actor_starting, "actor_vllm": fault_actor_vllm,
          "actor_judging": fault_actor_judging,
          "driver_kill": fault_driver_kill, "torn_raw_file": fault_torn_raw_file,
          "torn_cache_shard": fault_torn_cache_shard, "train_worker": fault_train_worker,
          "train_reward": fault_train_reward, "train_dpo": fault_train_dpo, "train_ppo": fault_train_ppo,
          "node_removed": fault_node_removed, "disk_full": fault_disk_full, "s3_flaky": fault_s3_flaky, "s3_restart": fault_s3_restart,
          "serve_replica": fault_serve_replica}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from: {', '.join(FAULTS)}")
    ap.add_argument("--prompts", type=int, default=32, help="rows per run")
    ap.add_argument("--keep", action="store_true", help="keep each fault's work directory")
    args = ap.parse_args(argv)
    chosen = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        ap.error(f"unknown fault {unknown[0]!r}: choose from {', '.join(FAULTS)}")
    from benchmarks.common import processor

    print(f"processor: {processor()}")
    root = Path(tempfile.mkdtemp(prefix="cai-chaos-"))
    model = tiny_model(root / "tiny-llama")
    rows = []
    for name in chosen:
        work = root / name
        work.mkdir()
        t0 = time.time()
        try:
            row = FAULTS[name](work, model, args.prompts)
        except Exception as e:  # noqa: BLE001 — a fault that breaks the harness is a fault not survived
            first = (str(e).strip().splitlines() or [""])[0][:300]
            row = {"fault": name, "in": args.prompts, "out": "?", "errors": "?", "lost": "?", "duplicated": "?",
                   "redone": "?", "finished": False, "checks": {f"the fault ran to its end ({type(e).__name__}: "
                                                                f"{first})": False},
                   "note": f"{type(e).__name__}: {first}"}
        row["seconds"] = round(time.time() - t0, 1)
        row["key"] = name
        rows.append(row)
        why = failed_checks(row) if row["finished"] is not None else []
        print(f"{row['fault']}: {'NOT survived' if why else 'survived' if row['finished'] else 'skipped'} "
              f"in {row['seconds']} s — {row['note']}", flush=True)
        if why:  # which fault, why, and how its runs ended: enough to find the failing case
            row["why"] = why
            print(f"  NOT survived: --faults {name} ({row['fault']})")
            for w in why:
                print(f"    {w}")
            print("  its console (stdout and stderr of each `cai` process it started), last lines:")
            print("\n".join("    | " + x for x in console_tails(work, 30).splitlines()), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    skipped = [r for r in rows if r["finished"] is None]
    rows_run = [r for r in rows if r["finished"] is not None]
    ok = [r for r in rows_run if not r.get("why")]
    for r in rows_run:
        if r.get("why"):
            print(f"NOT survived: {r['key']} ({r['fault']}): {'; '.join(r['why'])}")
    lost = sum(r["lost"] for r in rows if isinstance(r["lost"], int))
    dup = sum(r["duplicated"] for r in rows if isinstance(r["duplicated"], int))
    redone = max((r["redone"] / r["in"] for r in rows if isinstance(r["redone"], int) and r["in"]), default=0.0)
    print(f"\nfaults survived {len(ok)}/{len(rows_run)}, rows lost {lost}, duplicates {dup}, "
          f"work redone at most {100 * redone:.0f}%" + (f" ({len(skipped)} skipped)" if skipped else ""))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if len(ok) == len(rows_run) else 1


if __name__ == "__main__":
    sys.exit(main())
