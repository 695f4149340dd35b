"""The machinery of ``benchmarks/chaos.py``: ``cai run`` in a process session of its own, an engine
that counts what it is asked (``counting_engine``, the runs' ``engine_factory``), waiting, auditing a
stage's outputs, the recipes the faults run, and a flaky local S3 server."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LOG_ENV = "CAI_CHAOS_LOG"


def ctrl_c_reaches() -> None:
    """``preexec_fn`` for a process a test will stop with Ctrl-C: SIGINT back to its default, as in a
    terminal's foreground job. A shell that starts a command in the background without job control
    (``cmd &`` in a script, as CI runners may) makes it ignore SIGINT, an ignored signal stays ignored
    across ``exec``, and a Ctrl-C test run that way would find a process that cannot be stopped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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

    if path:  # this engine is loaded: its actor is past starting (see ``started_engines``)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"k": "ready", "u": "", "pid": os.getpid()}) + "\n")
    generate, choice = engine.generate, engine.choice_logprobs

    def counted_generate(conversations, params):
        log("g", conversations)
        return generate(conversations, params)

    def counted_choice(conversations, choices):
        log("j", conversations)
        return choice(conversations, choices)

    engine.generate, engine.choice_logprobs = counted_generate, counted_choice
    return engine


def started_engines(log_path: Path) -> set[int]:
    """Process ids of the engines that finished loading (``counting_engine``'s ``ready`` lines)."""
    if not log_path.is_file():
        return set()
    return {rec["pid"] for rec in map(json.loads, log_path.read_text(encoding="utf-8").splitlines())
            if rec["k"] == "ready"}


def short_answer_reward(messages, text: str, token_ids) -> float:
    """PPO's programmatic reward in the chaos runs (``reward_fn``): shorter answers score higher."""
    return 1.0 - min(1.0, len(token_ids) / 8)


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
        """``cai run RECIPE ARGS``."""
        return self.launch("run", str(self.recipe), *args)

    def launch(self, *argv: str) -> subprocess.Popen:
        """``cai ARGV`` in a new process session."""
        env = {**os.environ, LOG_ENV: str(self.log), "RAY_TMPDIR": self.ray_tmp, "CAI_ALLOW_RECIPE_CODE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
        env.pop("RAY_ADDRESS", None)
        out = self.work / f"console-{len(self.outputs) + 1}.txt"
        self.outputs.append(out)
        self.proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", *argv],
                                     cwd=ROOT, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=ctrl_c_reaches)
        self.sessions.append(self.proc.pid)
        return self.proc

    def text(self, i: int = -1) -> str:
        """The ``i``-th ``cai run``'s console, then the log it sent the libraries' and workers' output to
        (named on its first line)."""
        out = self.outputs[i].read_text(errors="replace") if self.outputs[i].is_file() else ""
        found = re.search(r" goes to (\S+) \(-v", out)
        log = ROOT / found.group(1) if found else None  # relative to the run's working directory
        return out + (log.read_text(errors="replace") if log is not None and log.is_file() else "")

    def console(self) -> str:
        return "".join(self.text(i) for i in range(len(self.outputs)))

    def failure(self, rc: int) -> str:
        """Nothing for exit 0; otherwise the exit code (for a table row's note; the benchmark prints
        the console's tail for a fault not survived, see ``console_tails``)."""
        return "" if rc == 0 else f"; exit {rc}"

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
        sys.path.insert(0, str(ROOT / "tests"))
        from ray_cluster import signal_all

        left = self.processes()
        signal_all(left, signal.SIGKILL, 15)
        return len(left)

    def close(self) -> None:
        self.end()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def console_tails(work: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of every console (stdout and stderr of each ``cai`` process, in the
    order they were started) of the fault run in ``work``, each under a header naming its file."""
    files = sorted(work.glob("console-*.txt"), key=lambda f: int(f.stem.split("-")[1]))
    parts = []
    for f in files:
        text = f.read_text(errors="replace").rstrip().splitlines()
        shown = text[-lines:]
        parts.append(f"--- {f.name}: {'last ' + str(len(shown)) + ' of ' if len(text) > lines else ''}"
                     f"{len(text)} line(s) ---")
        parts += shown
    return "\n".join(parts) if parts else "(no console: no `cai` process was started)"


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


def rows_in(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def cache_files(cache_dir: Path) -> list[Path]:
    """The label cache's files a reader reads now (compacted runs, then deltas)."""
    from workflows.judging.label_cache import LabelCache

    return [Path(f) for f in LabelCache(str(cache_dir)).files()]


def audit(fault: str, stage_dir: Path, dataset: str, id_col: str, input_ids: list[str],
          redone: int, finished: bool | dict[str, bool], note: str = "") -> dict:
    """A table row: ``stage_dir/dataset`` (ids in ``id_col``) and ``stage_dir/errors`` against the inputs.
    ``finished``: whether the run finished as it should, or the checks that say so, each by name
    (``{"exit 0": rc == 0, ...}``): the row then names those that failed (``failed_checks``)."""
    out, err = ids(stage_dir / dataset, id_col), ids(stage_dir / "errors", "id")
    kept = collections.Counter(out + err)
    checks = finished if isinstance(finished, dict) else {"finished": bool(finished)}
    return {"fault": fault, "in": len(input_ids), "out": len(out), "errors": len(err),
            "lost": len(set(input_ids) - set(kept)), "duplicated": sum(c - 1 for c in kept.values() if c > 1),
            "redone": redone, "finished": all(checks.values()), "checks": checks, "note": note}


def failed_checks(row: dict) -> list[str]:
    """Why a row's fault was not survived: its failed checks, rows lost, rows duplicated ([] if survived)."""
    checks = row.get("checks") or {"finished": bool(row["finished"])}
    why = [f"check failed: {name}" for name, ok in checks.items() if not ok]
    if isinstance(row["lost"], int) and row["lost"]:
        why.append(f"rows lost: {row['lost']}")
    if isinstance(row["duplicated"], int) and row["duplicated"]:
        why.append(f"rows duplicated: {row['duplicated']}")
    if not why and not row["finished"]:
        why.append("not finished")
    return why


# ---------------------------------------------------------------- recipes

def prompts_file(work: Path, n: int) -> tuple[Path, list[str]]:
    """``n`` distinct prompts (the shipped red-team set, first ``n``)."""
    from workflows.prompt_sources import BUILTIN_DIR

    texts = [json.loads(x)["prompt"] for x in (BUILTIN_DIR / "red_team.jsonl").read_text().splitlines()[:n]]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path, texts


def engine(model: str, concurrency: int = 2, batch_size: int = 2, backend: str = "auto") -> str:
    return (f"{{backend: {backend}, model: {model}, batch_size: {batch_size}, concurrency: {concurrency}, "
            f"num_cpus: 0.5, torch_threads: 1}}")


def head(work: Path) -> str:
    """A recipe's first lines: its run directory in ``work``, a two-CPU local cluster, no bars."""
    return f"name: chaos\nrun_dir: {work}/run\nray: {{num_cpus: 2, progress_bars: false}}\nstages:\n"


def sl_cai_recipe(work: Path, model: str, prompts: Path, tokens: int = 24, checkpoint_rows: int = 4,
                  extra: str = "", backend: str = "auto") -> str:
    return head(work) + f"""  - stage: prompts
    path: {prompts}
  - stage: critique_revision
    rounds: 1
    few_shot: 0
    checkpoint_rows: {checkpoint_rows}
    sampling: {{max_new_tokens: {tokens}}}
    engine_factory: benchmarks.chaos_harness:counting_engine
    engine: {engine(model, backend=backend)}
{extra}"""


def preference_stage(model: str, tokens: int = 8) -> str:
    return f"""  - stage: preference
    input: prompts
    samples_per_prompt: 2
    principles_per_pair: 1
    checkpoint_rows: 4
    sampling: {{max_new_tokens: {tokens}, temperature: 1.0}}
    engine_factory: benchmarks.chaos_harness:counting_engine
    policy: {engine(model, concurrency=1, batch_size=4)}
    judges: [{engine(model, concurrency=2, batch_size=2)}]
"""


def redone(counts: collections.Counter) -> int:
    return sum(c - 1 for c in counts.values() if c > 1)


# ---------------------------------------------------------------- the faults

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


def whole_checkpoint(stage_dir: Path) -> int | None:
    """The step (PPO: iteration) of the newest whole training checkpoint under ``stage_dir/_ray``, or
    None: the train state and DeepSpeed's ``latest`` tag there, the tag's model states among its files,
    and every ``.pt`` a readable zip archive — what a one-worker job resumes from (as
    ``training.checkpoints.newest_checkpoint`` judges it). A folder Ray removes meanwhile is skipped."""
    import zipfile

    for d in sorted(stage_dir.glob("_ray/*/checkpoint_*"), reverse=True):
        try:
            step = json.loads((d / "trainer_state.json").read_text())["step"]
            tag = (d / "deepspeed" / "latest").read_text().strip()
            pts = list((d / "deepspeed" / tag).glob("*.pt")) if tag else []
            if not any(f.name.endswith("model_states.pt") for f in pts):
                continue
            for f in pts:
                zipfile.ZipFile(f).close()
            return step
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            continue
    return None


def tear(path: Path) -> None:
    """Cut a file in half, as a writer killed mid-write or a bad disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class FlakyS3:
    """A local S3 server (moto) behind a proxy that can answer ``503 SlowDown`` to a share of the
    requests, hold answers back, or refuse connections (the server "stopped"). Both on 127.0.0.1."""

    def __init__(self, fail_share: float = 0.0, delay_s: float = 0.0, seed: int = 0):
        import random
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from moto.server import ThreadedMotoServer

        self.fail_share, self.delay_s, self.down = fail_share, delay_s, False
        self.counts = collections.Counter()
        rng, lock, owner = random.Random(seed), threading.Lock(), self
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port)
        self.moto.start()

        class Proxy(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                import http.client

                body = self._body()
                with lock:
                    owner.counts["requests"] += 1
                    fail = owner.down or rng.random() < owner.fail_share
                if owner.down:  # "stopped": drop the connection without an answer
                    owner.counts["dropped"] += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail:
                    owner.counts["503"] += 1
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                conn = http.client.HTTPConnection("127.0.0.1", owner.moto_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                self.send_header("Content-Length", r.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                """The request body, also when the client streams it in HTTP chunks."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_REGION": "us-east-1"}
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="cai")

    @contextlib.contextmanager
    def _direct(self):
        """This process's storage calls go to the server itself, past the proxy."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update({**self.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.moto_port}"})
        try:
            yield
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def files(self, uri: str) -> list[str]:
        """Parquet files under ``uri`` on the server."""
        from workflows.core import storage

        with self._direct():
            return storage.list_files(uri, ".parquet")

    def ids(self, uri: str, column: str) -> list[str]:
        """Ids in a dataset on the server."""
        import pyarrow.parquet as pq

        from workflows.core import storage

        with self._direct():
            out = []
            for f in storage.list_files(uri, ".parquet"):
                fs, path = storage.resolve(f)
                out += pq.read_table(path, columns=[column], filesystem=fs)[column].to_pylist()
            return out

    def close(self) -> None:
        self.proxy.shutdown()
        self.proxy.server_close()
        self.moto.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(out: Path, **config) -> str:
    """A tiny random Llama with the embedded model's tokenizer (what the tests use; ``config``
    overrides its shape, e.g. ``head_dim=32`` for vLLM's CPU attention)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama

    return str(build_tiny_llama(out, **config))


def table(rows: list[dict]) -> str:
    cols = ["fault", "in", "out", "errors", "lost", "duplicated", "redone", "finished"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
