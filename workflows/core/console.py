"""What a person at the terminal sees during a run.

``cai run`` is quiet by default: ``to_log(path)`` sends everything this process writes to its
stdout and stderr — Ray's and Ray Data's logs, the workers' forwarded lines (model loading bars,
DeepSpeed's notices, our own per-step lines), library warnings, the C++ core worker's log lines — to
a log file, at the file-descriptor level, so nothing that bypasses Python escapes it either. What is
meant for the person — each stage's progress line and summary, notes, errors — goes through
``say`` (and ``Progress``), which writes to the terminal *and* the log, so the log has it all in
order. ``cai run -v`` skips ``to_log``: then ``say`` is a plain print and everything shows as it
comes. Outside the command line (tests, a notebook) nothing is redirected either.

Progress: one line per stage — rows or steps done, the rate, the time left. On a terminal it is
redrawn in place; elsewhere (a pipe, a CI log, ``-v``) it is printed at most every ``EVERY_S``
seconds when it has moved, and once at the end, so a long job in a log file still shows it is moving."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, TextIO

EVERY_S = 30.0  # between progress lines where they cannot be redrawn in place


class _Terminal:
    out: TextIO | None = None  # the terminal's stdout and stderr, saved before the redirect
    err: TextIO | None = None
    log_path: str | None = None


def to_log(path: str) -> str:
    """Redirect this process's stdout and stderr (file descriptors 1 and 2, inherited by anything
    it starts) to ``path`` (appended); ``say`` keeps writing to the terminal. Returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _Terminal.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _Terminal.err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _Terminal.log_path = path
    return path


def log_path() -> str | None:
    """Where ``to_log`` sends the output, or None."""
    return _Terminal.log_path


def quiet() -> bool:
    """True once ``to_log`` has sent the libraries' output to the log."""
    return _Terminal.out is not None


def say(text: str = "", err: bool = False) -> None:
    """A line for the person running: to the terminal (stderr if ``err``) and, when quiet, the log."""
    if _Terminal.out is None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
        return
    (_Terminal.err if err else _Terminal.out).write(text + "\n")
    print(text, flush=True)  # the log: fd 1


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(stage: str, done: float, total: float | None, unit: str, elapsed: float,
                  rate: float | None = None) -> str:
    """``[sft] 12/48 steps · 0.80 steps/s · 15 s · 45 s left``: ``rate`` units per second (by default
    ``done / elapsed``); no rate before the first unit, no time left without a total."""
    count = f"{done:g}/{total:g}" if total else f"{done:g}"
    parts = [f"[{stage}] {count} {unit}"]
    if rate is None:
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    if rate:
        parts.append(f"{rate:.2f} {unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s per {unit.rstrip('s')}")
    parts.append(duration(elapsed))
    if rate and total and done < total:
        parts.append(f"{duration((total - done) / rate)} left")
    return " · ".join(parts)


class Progress:
    """One stage's progress line (module docstring): ``update(done=…)`` or ``update(add=…)``,
    then ``close()`` prints the last state once, on its own line. The rate counts from the first
    update on, so work a resumed stage had already done (its first ``done``) does not inflate it."""

    def __init__(self, stage: str, total: float | None, unit: str = "rows", clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.unit, self.clock = stage, total, unit, clock
        self.done = 0.0
        self.start = self.last = clock()
        self.first: tuple[float, float] | None = None  # (time, done) at the first update
        self.said = -1.0  # done at the last printed line
        self.width = 0
        self.closed = False
        stream = _Terminal.out
        self.in_place = bool(stream is not None and stream.isatty())

    def line(self) -> str:
        now = self.clock()
        rate = 0.0
        if self.first is not None and now > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (now - self.first[0])
        return progress_line(self.stage, self.done, self.total, self.unit, now - self.start, rate)

    def update(self, done: float | None = None, add: float = 0.0) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (now, self.done if done is None else done)
        self.done = (self.done if done is None else done) + add
        if self.in_place:
            text = self.line()
            _Terminal.out.write("\r" + text.ljust(self.width))
            _Terminal.out.flush()
            self.width = len(text)
        elif now - self.last >= EVERY_S and self.done != self.said:  # nothing new: nothing to print
            self.last, self.said = now, self.done
            say(self.line())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.in_place and self.said == self.done:
            return  # its last state is the line printed last
        text = self.line()
        if self.in_place:
            _Terminal.out.write("\r" + " " * self.width + "\r")
        say(text)


@contextlib.contextmanager
def watching(read: Callable[[], dict | None], stage: str, every_s: float = 2.0):
    """While the body runs (a training job on other processes), poll ``read()`` — ``{"done": n,
    "total": m, "unit": "steps"}`` or None — every ``every_s`` seconds and show it as the stage's
    progress line; once more at the end."""
    stop = threading.Event()
    shown: list[Progress] = []

    def poll() -> None:
        try:
            got = read()
        except Exception:  # noqa: BLE001 — a torn or missing file: ask again next time
            got = None
        if got:
            if not shown:
                shown.append(Progress(stage, got.get("total"), got.get("unit", "steps")))
            shown[0].total = got.get("total") or shown[0].total
            shown[0].update(done=float(got["done"]))

    def loop() -> None:
        while not stop.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name=f"{stage}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)
        poll()
        if shown:
            shown[0].close()
