"""A real Ray cluster from ``ray start``: a head (and more nodes) on this machine, each with explicit
ports and its own temp dir, auth mode set explicitly, and stopped by the process ids it started (never
by a command that ends every Ray process on the machine)."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now, chosen between Ray's worker ports (10002–19999)
    and the kernel's ephemeral range: a port the kernel hands out itself (``bind(0)``) can be taken
    by any process's next outgoing connection before the test binds it again (seen: Serve's proxy
    "failed to bind" in a full run), while no one is handed these."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    rng, ports = random.SystemRandom(), []
    while len(ports) < n:
        port = rng.randrange(20000, max(20001, ephemeral))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


class LocalCluster:
    """``ray start --head`` plus optional worker nodes; ``dashboard`` is the Jobs API address."""

    def __init__(self, num_cpus: int = 2, env: dict | None = None, auth_token: str | None = None):
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
        self.env["RAY_AUTH_MODE"] = "token" if auth_token else "disabled"
        if auth_token:
            self.env["RAY_AUTH_TOKEN"] = auth_token
        else:
            self.env.pop("RAY_AUTH_TOKEN", None)
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.temp_dirs: list[str] = []
        self.sessions: list[int] = []
        gcs, dash, client, metrics = free_ports(4)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self._start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                     "--include-dashboard=true", f"--ray-client-server-port={client}",
                     f"--metrics-export-port={metrics}",
                     f"--num-cpus={num_cpus}"])
        self._wait_for_dashboard()

    def _start(self, args: list[str]) -> None:
        temp = tempfile.mkdtemp(prefix="cai-rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(temp)
        node_manager, object_manager, agent, agent_grpc, runtime_env_agent = free_ports(5)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, f"--temp-dir={temp}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env_agent}", "--object-store-memory=300000000",
               "--disable-usage-stats"]
        # a session of its own: every daemon `ray start` leaves behind keeps this session id, even once
        # re-parented to init, so stop() finds them all (and nothing else on the machine)
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.sessions.append(proc.pid)
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}\n{err[-3000:]}")

    def add_node(self, num_cpus: int = 2, resources: str | None = None) -> None:
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        self._start(args)

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        import urllib.error
        import urllib.request

        end = time.time() + timeout
        while time.time() < end:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:  # it answers (401 without a token on a token-auth cluster)
                return
            except Exception:  # noqa: BLE001 — not up yet
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"the dashboard at {self.dashboard} did not come up")

    def processes(self, node: int | None = None) -> list[psutil.Process]:
        """Every process this cluster started (or node ``node`` of it, 0 the head, in the order they
        were added): those in its `ray start` sessions or naming one of its temp dirs, and their
        descendants."""
        sessions = self.sessions if node is None else [self.sessions[node]]
        temps = self.temp_dirs if node is None else [self.temp_dirs[node]]
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or [])
                sid = os.getsid(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
                continue
            if sid in sessions or any(t in line for t in temps):
                found[p.pid] = p
                try:
                    for c in p.children(recursive=True):
                        found[c.pid] = c
                except psutil.NoSuchProcess:
                    pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def remove_node(self, node: int) -> int:
        """Take node ``node`` away at once, as a machine that loses power does: SIGKILL its raylet, its
        object store and every worker on it. Returns how many processes were killed."""
        procs = self.processes(node)
        signal_all(procs, signal.SIGKILL, 15)
        return len(procs)

    def stop(self) -> None:
        alive = signal_all(self.processes(), signal.SIGTERM, 5)
        signal_all(alive, signal.SIGKILL, 10)


def signal_all(procs: list[psutil.Process], sig: int, wait_s: float) -> list[psutil.Process]:
    """Send ``sig`` to each of ``procs`` (ids this caller found itself), wait up to ``wait_s`` seconds;
    returns those still alive."""
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(procs, timeout=wait_s)[1]
