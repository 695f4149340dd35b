"""The stepping thread that lets concurrent calls share one vLLM engine, against a scripted engine
with vLLM's offline-engine interface (add_request / step / abort_request): calls overlap in one
running batch, rows stop on request, a failed step fails its calls and the next call works."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from actors.base import EngineError
from actors.vllm_stepper import Stepper


class ScriptedEngine:
    """Each request decodes one token per step (its prompt's first id, repeated) until it has
    ``sp`` tokens; ``fail_at`` makes that step raise. Records the request ids of every step."""

    def __init__(self, fail_at: int | None = None):
        self.reqs: dict[str, dict] = {}
        self.steps: list[set[str]] = []
        self.fail_at = fail_at
        self.aborted: list[str] = []

    def add_request(self, rid, prompt, sp):
        if sp < 1:
            raise ValueError("max_tokens must be at least 1")
        self.reqs[rid] = {"tok": prompt["prompt_token_ids"][0], "want": sp, "ids": []}

    def abort_request(self, rids):
        for rid in rids:
            self.aborted.append(rid)
            self.reqs.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        time.sleep(0.005)
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            self.steps.append(set())
            raise RuntimeError("engine core died")
        self.steps.append(set(self.reqs))
        outs = []
        for rid, r in list(self.reqs.items()):
            r["ids"].append(r["tok"])
            done = len(r["ids"]) >= r["want"]
            outs.append(SimpleNamespace(request_id=rid, finished=done,
                                        outputs=[SimpleNamespace(token_ids=list(r["ids"]))]))
            if done:
                del self.reqs[rid]
        return outs


def test_rows_come_back_in_order_with_their_tokens_and_a_refused_row_is_named():
    eng = ScriptedEngine()
    got: dict[int, list[int]] = {}
    out = Stepper(eng).run([[7], [8], [9]], [3, 0, 5], on_tokens=lambda k, ids: got.setdefault(k, []).extend(ids))
    assert out[1].startswith("generate_error: ValueError: max_tokens")
    assert [o.outputs[0].token_ids for o in (out[0], out[2])] == [[7, 7, 7], [9] * 5]
    assert got == {0: [7, 7, 7], 2: [9] * 5}  # one token per step, all delivered before the call returns


def test_concurrent_calls_share_the_running_batch():
    eng = ScriptedEngine()
    stepper = Stepper(eng)
    results = {}

    def call(name, tok, n):
        results[name] = stepper.run([[tok]], [n])

    first = threading.Thread(target=call, args=("long", 1, 40))
    first.start()
    while len(eng.steps) < 3:  # the first call is decoding
        time.sleep(0.001)
    call("short", 2, 5)  # joins the running batch: done long before the first call
    first.join()
    assert len(results["short"][0].outputs[0].token_ids) == 5 and len(results["long"][0].outputs[0].token_ids) == 40
    shared = [s for s in eng.steps if len(s) == 2]
    assert 5 <= len(shared) <= 6 and len(eng.steps) <= 41  # no step ran either call alone once both were in


def test_should_stop_aborts_a_row_and_the_rest_finish():
    eng = ScriptedEngine()
    seen: dict[int, int] = {}

    def on_tokens(k, ids):
        seen[k] = seen.get(k, 0) + len(ids)

    out = Stepper(eng).run([[1], [2]], [30, 30], on_tokens, should_stop=lambda k: k == 0 and seen.get(0, 0) >= 3)
    assert out[0] == "cancelled" and 3 <= seen[0] < 30 and len(out[1].outputs[0].token_ids) == 30
    assert len(eng.aborted) == 1


def test_a_failed_step_fails_the_waiting_calls_and_the_next_call_works():
    eng = ScriptedEngine(fail_at=2)
    stepper = Stepper(eng)
    with pytest.raises(EngineError, match="vLLM failed while generating: RuntimeError: engine core died"):
        stepper.run([[1], [2]], [10, 10])
    assert eng.reqs == {}  # its rows were aborted
    assert len(stepper.run([[3]], [4])[0].outputs[0].token_ids) == 4


def test_an_on_tokens_that_raises_ends_its_own_call_only():
    eng = ScriptedEngine()
    stepper = Stepper(eng)

    def boom(k, ids):
        raise ValueError("client gone")

    with pytest.raises(ValueError, match="client gone"):
        stepper.run([[1]], [10], on_tokens=boom)
    assert len(stepper.run([[2]], [3])[0].outputs[0].token_ids) == 3
