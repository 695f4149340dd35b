"""One thread steps a vLLM engine for every caller: requests of concurrent ``generate`` calls (a
server's overlapping batches) join the batch vLLM is already running — continuous batching —
instead of each call waiting for the one before it. No vLLM import here: the engine is given.

A caller adds its requests, then waits; the stepping thread runs ``engine.step()`` while any
request is live and hands each output to its call (new tokens to ``on_tokens``, under the lock,
so a row's last tokens always arrive before its call returns). A caller whose ``should_stop``
answers true for a row aborts it; a caller that is interrupted aborts all of its rows; a failed
step fails every call then waiting, and the next call starts afresh.
"""
from __future__ import annotations

import itertools
import threading
import time

from actors.base import EngineError


class _Call:
    def __init__(self, n: int, on_tokens):
        self.results: list = [None] * n
        self.live: dict[str, int] = {}  # request id → row
        self.seen = [0] * n
        self.on_tokens = on_tokens
        self.error: BaseException | None = None


class Stepper:
    """``setup`` runs first in the stepping thread (a CPU engine's thread count: OpenMP keeps it
    per thread, and vLLM's CPU attention checks that it matches the count it was planned with)."""

    def __init__(self, engine, setup=None, poll_s: float = 0.02):
        self.engine, self.setup, self.poll_s = engine, setup, poll_s
        self._cv = threading.Condition()
        self._calls: dict[str, _Call] = {}  # live request id → its call
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def run(self, prompts: list[list[int]], sps: list, on_tokens=None, should_stop=None) -> list:
        """Each prompt's final ``RequestOutput``, in order; a prompt vLLM refuses, or a row
        ``should_stop(row)`` stopped, gets a reason string instead. ``on_tokens(row, ids)`` gets a
        row's new token ids (``sps`` must then ask for cumulative outputs)."""
        call = _Call(len(prompts), on_tokens)
        with self._cv:
            for k, (ids, sp) in enumerate(zip(prompts, sps)):
                rid = f"cai-{next(self._ids)}"
                try:
                    self.engine.add_request(rid, {"prompt_token_ids": ids}, sp)
                except Exception as e:  # noqa: BLE001 — vLLM's own validation: this row only
                    call.results[k] = f"generate_error: {type(e).__name__}: {e}"
                    continue
                call.live[rid] = k
                self._calls[rid] = call
            if call.live:
                self._start()
                self._cv.notify_all()
        try:
            while True:
                with self._cv:
                    if not call.live or call.error is not None:
                        break
                    self._cv.wait(self.poll_s)
                if should_stop is not None:
                    with self._cv:
                        self._abort(call, [rid for rid, k in call.live.items() if should_stop(k)], "cancelled")
        except BaseException:  # interrupted: nothing of this call keeps decoding
            with self._cv:
                self._abort(call, list(call.live), "cancelled")
            raise
        if call.error is not None:
            raise call.error
        return call.results

    # ---------------------------------------------------------------- under the lock
    def _abort(self, call: _Call, rids: list[str], reason: str) -> None:
        if not rids:
            return
        self.engine.abort_request(rids)
        for rid in rids:
            call.results[call.live.pop(rid)] = reason
            self._calls.pop(rid, None)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="vllm-stepper", daemon=True)
            self._thread.start()

    def _fail(self, error: BaseException) -> None:
        for call in {id(c): c for c in self._calls.values()}.values():
            call.error = error
            call.live.clear()
        self._calls.clear()

    def _loop(self) -> None:
        if self.setup is not None:
            self.setup()
        while True:
            with self._cv:  # released between steps: callers add requests and abort rows then
                while not self._calls:
                    self._cv.wait()
                self._step()
                self._cv.notify_all()
            time.sleep(0)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except BaseException as e:  # noqa: BLE001 — every waiting call learns it, the thread goes on
            live = list(self._calls)
            self._fail(EngineError(f"vLLM failed while generating: {type(e).__name__}: {e}"))
            try:
                self.engine.abort_request(live)
            except Exception:  # noqa: BLE001 — a dead engine cannot abort either
                pass
            return
        for out in outs:
            call = self._calls.get(out.request_id)
            if call is None:
                continue
            try:
                self._deliver(call, out)
            except Exception as e:  # noqa: BLE001 — the caller's on_tokens failed: its call ends with it
                call.error = e
                self._abort(call, list(call.live), "generate_error: on_tokens failed")
        if self._calls and not self.engine.has_unfinished_requests():
            self._fail(EngineError(f"vLLM dropped {len(self._calls)} request(s) without an output"))

    def _deliver(self, call: _Call, out) -> None:
        k = call.live[out.request_id]
        if call.on_tokens is not None:
            new = list(out.outputs[0].token_ids[call.seen[k]:])
            call.seen[k] += len(new)
            if new:
                call.on_tokens(k, new)
        if out.finished:
            call.results[k] = out
            del call.live[out.request_id]
            del self._calls[out.request_id]
