"""Faults injected into real runs — `cai run` on a local Ray cluster with a tiny random Llama — each
checked for rows lost, rows duplicated and work redone. Prints one table row per fault and, last:

    faults survived N/N, rows lost 0, duplicates 0, work redone at most X%

    python benchmarks/chaos.py [--faults actor_sl_cai,driver_kill,...] [--prompts 48] [--keep]

Faults (``FAULTS``):
- ``actor_sl_cai`` / ``actor_judging``: one engine actor killed (SIGKILL) mid-stage, in SL-CAI and
  in preference judging: Ray restarts it and retries its block; finalize keeps one copy per id.
- ``driver_kill``: the driver killed (SIGKILL) mid-stage, its Ray processes ended, then the same
  command run again: finished stages skipped, the interrupted one redoes at most its in-flight blocks.
- ``torn_raw_file``: as ``driver_kill``, and one raw file the killed run left is cut in half before
  the rerun: set aside as ``*.unreadable``, counted in the summary, its rows redone.
- ``torn_cache_shard``: a label-cache shard cut in half, then the preference stage redone: the
  shard is set aside and counted, its judgments made again.
- ``train_worker``: the Ray Train worker killed (SIGKILL) mid-step in SFT: the job restarts from
  its last checkpoint (``max_failures``) and the loss curve goes on from there, one record per step.

How it measures: every run's engines come from ``counting_engine`` (``engine_factory``), which
logs each conversation it is asked to answer or judge; "redone" is the number of conversations a
row needed beyond one attempt (a killed in-flight batch, a block done again). Rows in, out and
errors come from the stage's datasets; lost = inputs in neither, duplicated = ids seen twice.
Processes: each run is its own process session (``start_new_session``), so its Ray processes are
found — and, at the end, ended — by session id, never by name.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LOG_ENV = "CAI_CHAOS_LOG"


# ---------------------------------------------------------------- the counting engine (runs in actors)

def counting_engine(cfg):
    """``engine_factory``: the configured engine, logging the last user message of every conversation
    it generates for (``g``) or judges (``j``) to ``$CAI_CHAOS_LOG``, one JSON line each."""
    from actors import make_engine

    engine = make_engine(cfg)
    path = os.environ.get(LOG_ENV)

    def log(kind: str, conversations) -> None:
        if path:
            lines = "".join(json.dumps({"k": kind, "u": next((m["content"] for m in reversed(c) if m["role"] == "user"),
                                                             "")}) + "\n" for c in conversations)
            with open(path, "a", encoding="utf-8") as f:  # O_APPEND: lines of concurrent actors do not mix
                f.write(lines)

    generate, choice = engine.generate, engine.choice_logprobs

    def counted_generate(conversations, params):
        log("g", conversations)
        return generate(conversations, params)

    def counted_choice(conversations, choices):
        log("j", conversations)
        return choice(conversations, choices)

    engine.generate, engine.choice_logprobs = counted_generate, counted_choice
    return engine


def attempts(log_path: Path, kind: str, texts: set[str] | None = None) -> collections.Counter:
    """How many times each conversation (by its last user message) of ``kind`` was sent to an engine."""
    seen: collections.Counter = collections.Counter()
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["k"] == kind and (texts is None or rec["u"] in texts):
                seen[rec["u"]] += 1
    return seen


# ---------------------------------------------------------------- a `cai run` in its own process session

class CaiRun:
    """``cai run RECIPE`` as a subprocess in a session of its own; its Ray temp dir is its own too."""

    def __init__(self, work: Path, recipe: str):
        self.work, self.recipe = work, work / "recipe.yaml"
        self.recipe.write_text(recipe)
        self.log = work / "engine_calls.jsonl"
        self.ray_tmp = tempfile.mkdtemp(prefix="cx", dir="/tmp")  # short: Ray's socket paths live under it
        self.proc: subprocess.Popen | None = None
        self.sessions: list[int] = []
        self.outputs: list[Path] = []

    def start(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, LOG_ENV: str(self.log), "RAY_TMPDIR": self.ray_tmp, "CAI_ALLOW_ENGINE_FACTORY": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
        env.pop("RAY_ADDRESS", None)
        out = self.work / f"console-{len(self.outputs) + 1}.txt"
        self.outputs.append(out)
        self.proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", str(self.recipe), *args],
                                     cwd=ROOT, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.sessions.append(self.proc.pid)
        return self.proc

    def console(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.outputs if p.is_file())

    def processes(self):
        """Every live process of this run's sessions (the driver, its Ray cluster, its workers)."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) in self.sessions:
                    found.append(p)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def find(self, title: str):
        """Live processes of this run whose command line (a Ray worker's process title) contains ``title``."""
        import psutil

        out = []
        for p in self.processes():
            try:
                if title in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end()
            raise RuntimeError(f"`cai run` did not finish in {timeout:.0f} s; console:\n{self.console()[-3000:]}")

    def end(self) -> int:
        """SIGKILL every process left in this run's sessions; returns how many there were."""
        import psutil

        left = self.processes()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=15)
        return len(left)

    def close(self) -> None:
        self.end()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def wait_until(pred, timeout: float, what: str, run: CaiRun | None = None, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        if run is not None and run.proc.poll() is not None:
            raise RuntimeError(f"`cai run` ended (exit {run.proc.returncode}) before {what}:\n{run.console()[-3000:]}")
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def raw_files(stage_dir: Path) -> list[Path]:
    return sorted((stage_dir / "_raw").rglob("*.parquet")) if (stage_dir / "_raw").is_dir() else []


# ---------------------------------------------------------------- what a stage kept

def ids(dataset: Path, column: str) -> list[str]:
    """Ids in the readable parquet files under ``dataset`` (a file a killed writer cut short is skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: list[str] = []
    for f in sorted(dataset.rglob("*.parquet")) if dataset.is_dir() else []:
        try:
            out += pq.read_table(f, columns=[column])[column].to_pylist()
        except (pa.ArrowInvalid, OSError):
            pass
    return out


def ids_in(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column])[column].to_pylist()


def audit(fault: str, stage_dir: Path, dataset: str, id_col: str, input_ids: list[str],
          redone: int, finished: bool, note: str = "") -> dict:
    """A table row: ``stage_dir/dataset`` (ids in ``id_col``) and ``stage_dir/errors`` against the inputs."""
    out, err = ids(stage_dir / dataset, id_col), ids(stage_dir / "errors", "id")
    kept = collections.Counter(out + err)
    return {"fault": fault, "in": len(input_ids), "out": len(out), "errors": len(err),
            "lost": len(set(input_ids) - set(kept)), "duplicated": sum(c - 1 for c in kept.values() if c > 1),
            "redone": redone, "finished": finished, "note": note}


# ---------------------------------------------------------------- recipes

def prompts_file(work: Path, n: int) -> tuple[Path, list[str]]:
    """``n`` distinct prompts (the shipped red-team set, first ``n``)."""
    from workflows.prompts.sources import BUILTIN_DIR

    texts = [json.loads(x)["prompt"] for x in (BUILTIN_DIR / "red_team.jsonl").read_text().splitlines()[:n]]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path, texts


def engine(model: str, concurrency: int = 2, batch_size: int = 2) -> str:
    return (f"{{model: {model}, batch_size: {batch_size}, concurrency: {concurrency}, num_cpus: 0.5, "
            f"torch_threads: 1}}")


def head(work: Path) -> str:
    """A recipe's first lines: its run directory in ``work``, a two-CPU local cluster, no bars."""
    return f"name: chaos\nrun_dir: {work}/run\nray: {{num_cpus: 2, progress_bars: false}}\nstages:\n"


def sl_cai_recipe(work: Path, model: str, prompts: Path, tokens: int = 24, checkpoint_rows: int = 4,
                  extra: str = "") -> str:
    return head(work) + f"""  - stage: prompts
    path: {prompts}
  - stage: critique_revision
    rounds: 1
    few_shot: 0
    checkpoint_rows: {checkpoint_rows}
    sampling: {{max_new_tokens: {tokens}}}
    engine_factory: benchmarks.chaos:counting_engine
    engine: {engine(model)}
{extra}"""


def preference_stage(model: str, tokens: int = 8) -> str:
    return f"""  - stage: preference
    input: prompts
    samples_per_prompt: 2
    principles_per_pair: 1
    checkpoint_rows: 4
    sampling: {{max_new_tokens: {tokens}, temperature: 1.0}}
    engine_factory: benchmarks.chaos:counting_engine
    policy: {engine(model, concurrency=1, batch_size=4)}
    judges: [{engine(model, concurrency=2, batch_size=2)}]
"""


def _redone(counts: collections.Counter) -> int:
    return sum(c - 1 for c in counts.values() if c > 1)


# ---------------------------------------------------------------- the faults

def fault_actor_sl_cai(work: Path, model: str, n: int) -> dict:
    prompts, texts = prompts_file(work, n)
    run = CaiRun(work, sl_cai_recipe(work, model, prompts))
    try:
        run.start()
        stage = work / "run" / "critique_revision"
        victim = wait_until(lambda: run.find("CritiqueReviseWorker"), 300, "an engine actor", run)[0]
        wait_until(lambda: raw_files(stage), 300, "the first raw file", run, every=0.05)
        victim.send_signal(signal.SIGKILL)  # mid-stage: the first block is saved, the rest are not
        rc = run.wait(600)
        counts = attempts(run.log, "g", set(texts))
        return audit("engine actor killed (SL-CAI)", stage, "sl_cai", "prompt_id",
                     ids(work / "run" / "prompts" / "prompts", "prompt_id"), _redone(counts), rc == 0,
                     f"actor pid {victim.pid} killed once the first block was saved")
    finally:
        run.close()


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
                     pair_ids, _redone(attempts(run.log, "j")), rc == 0, f"judge actor pid {victim.pid} killed")
    finally:
        run.close()


def kill_driver_mid_stage(run: CaiRun, stage: Path, min_files: int = 1) -> list[str]:
    """Start, wait for ``min_files`` raw files, SIGKILL the driver alone (as the OOM killer would),
    give Ray's own processes 10 s to notice, then end the rest; returns the names of those left."""
    import psutil

    run.start()
    wait_until(lambda: len(raw_files(stage)) >= min_files, 300, f"{min_files} raw file(s)", run)
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(30)
    try:
        wait_until(lambda: not run.processes(), 10, "the run's Ray processes to exit")
    except RuntimeError:
        pass
    names = []
    for p in run.processes():
        try:
            names.append(p.name())
        except psutil.NoSuchProcess:
            pass
    run.end()
    return sorted(names)


def tear(path: Path) -> None:
    """Cut a file in half, as a writer killed mid-write or a bad disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


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
        console = run.console()
        summary = (stage / "summary.md").read_text() if (stage / "summary.md").is_file() else ""
        repaired = "repaired: 1 unreadable file" in summary
        counts = attempts(run.log, "g", set(texts))
        name = "raw file torn, then rerun" if torn_file else "driver killed (SIGKILL), then rerun"
        note = (f"{saved} rows saved before the kill; still running 10 s after the driver died: {left or 'nothing'}"
                f"{torn}; resumed: {'resuming:' in console}"
                + (f"; summary counts the torn file: {repaired}" if torn_file else ""))
        return audit(name, stage, "sl_cai", "prompt_id",
                     ids(work / "run" / "prompts" / "prompts", "prompt_id"), _redone(counts),
                     rc == 0 and "resuming:" in console and (repaired or not torn_file), note)
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
    engine_factory: benchmarks.chaos:counting_engine
    judges: [{engine(model, concurrency=2, batch_size=2)}]
"""
    run = CaiRun(work, recipe)
    try:
        run.start()
        first = run.wait(600)
        judged = sum(attempts(run.log, "j").values())
        shards = sorted((work / "run" / "label_cache").rglob("*.parquet"))
        victim, kept = shards[0], sum(len(ids_in(f, "key")) for f in shards[1:])
        tear(victim)
        run.log.unlink()
        run.start("--restart-from", "preference")
        rc = run.wait(600)
        again = sum(attempts(run.log, "j").values())
        summary = (work / "run" / "preference" / "summary.md").read_text()
        repaired = "repaired: 1 unreadable file" in summary
        pair_ids = ids(work / "run" / "preference" / "pairs", "pair_id")
        return audit("label-cache shard torn, stage redone", work / "run" / "preference" / "_judging", "labels",
                     "pair_id", pair_ids, again, first == 0 and rc == 0 and repaired and again == judged - kept,
                     f"{len(shards)} shards, 1 torn; {judged} judgments in the first run, {again} made again "
                     f"(the torn shard's {judged - kept}); summary counts it: {repaired}")
    finally:
        run.close()


def fault_train_worker(work: Path, model: str, n: int) -> dict:
    prompts, _ = prompts_file(work, n)
    recipe = sl_cai_recipe(work, model, prompts, tokens=12, extra=f"""  - stage: sft
    model: {model}
    num_workers: 1
    micro_batch_size: 1
    max_steps: 24
    epochs: 3
    checkpoint_every: 4
    max_failures: 2
    eval_fraction: 0.0
""")
    run = CaiRun(work, recipe)
    stage = work / "run" / "sft"
    try:
        run.start()
        wait_until(lambda: list(stage.glob("_ray/sft/checkpoint_20*/trainer_state.json")), 600,
                   "the first SFT checkpoint", run, every=0.05)
        wait_until(lambda: run.find("RayTrainWorker"), 60, "the train worker", run)
        time.sleep(0.5)  # mid-step, past the checkpoint (or writing the next one: the torn one is skipped)
        victims = run.find("RayTrainWorker")
        for v in victims:
            v.send_signal(signal.SIGKILL)
        rc = run.wait(900)
        info = json.loads((stage / "_SUCCESS").read_text()) if (stage / "_SUCCESS").is_file() else {}
        training = info.get("training", {})
        hist = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()] \
            if (stage / "metrics.jsonl").is_file() else []
        steps = [h["step"] for h in hist]
        total = training.get("total_steps", 0)
        printed = [line for line in run.console().splitlines() if "[sft] step " in line]
        curve_ok = bool(total) and steps == list(range(1, total + 1))
        return {"fault": "train worker killed mid-step (SFT)", "in": total, "out": len(steps), "errors": 0,
                "lost": total - len(set(steps)), "duplicated": len(steps) - len(set(steps)),
                "redone": max(0, len(printed) - total), "finished": rc == 0 and curve_ok and training.get("resumes", 0) >= 1,
                "note": f"resumes {training.get('resumes')}, from steps {training.get('resumed_from_steps')}; "
                        f"loss curve steps 1..{total} once each: {curve_ok} (rows here are optimizer steps)"}
    finally:
        run.close()


FAULTS = {"actor_sl_cai": fault_actor_sl_cai, "actor_judging": fault_actor_judging,
          "driver_kill": fault_driver_kill, "torn_raw_file": fault_torn_raw_file,
          "torn_cache_shard": fault_torn_cache_shard, "train_worker": fault_train_worker}


def tiny_model(out: Path) -> str:
    """A tiny random Llama with the embedded model's tokenizer (what the tests use)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama

    return str(build_tiny_llama(out))


def table(rows: list[dict]) -> str:
    cols = ["fault", "in", "out", "errors", "lost", "duplicated", "redone", "finished"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


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
            row = {"fault": name, "in": args.prompts, "out": "?", "errors": "?", "lost": "?", "duplicated": "?",
                   "redone": "?", "finished": False, "note": f"{type(e).__name__}: {str(e)[:300]}"}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{row['fault']}: {'survived' if row['finished'] else 'NOT survived'} in {row['seconds']} s — {row['note']}",
              flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    ok = [r for r in rows if r["finished"] and r["lost"] == 0 and r["duplicated"] == 0]
    lost = sum(r["lost"] for r in rows if isinstance(r["lost"], int))
    dup = sum(r["duplicated"] for r in rows if isinstance(r["duplicated"], int))
    redone = max((r["redone"] / r["in"] for r in rows if isinstance(r["redone"], int) and r["in"]), default=0.0)
    print(f"\nfaults survived {len(ok)}/{len(rows)}, rows lost {lost}, duplicates {dup}, "
          f"work redone at most {100 * redone:.0f}%")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
