"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (stdlib, no network).

The fake model is deterministic and scripted by the last user message:
``echo`` → "ECHO: <upper-cased message>"; ``FAIL400`` → 400; ``FLAKY429``/``FLAKY500`` → that
status on the first attempt, then success; ``ALWAYS503`` → 503 forever; ``SLOW`` → waits at the
server's :class:`Gate` (to observe concurrency); ``HANG`` → sleeps past the client timeout.
Logprob requests answer with a top-k list chosen by ``prefer A`` / ``prefer B`` / ``only A`` /
anything else.

``state["in_flight"]`` counts the requests the server has read in full and not yet begun to
answer: it goes down *before* the first byte of a response is written, so a client cannot have
sent its next request on a freed slot while the finished one is still counted.
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from actors import make_engine
from actors.base import Engine, EngineError, SamplingParams
from actors.config import EngineConfig, OpenAIOptions
from actors.openai_engine import OpenAIEngine, choice_matches, match_choices, retry_delay, row_seeds

KEY_ENV = "CAI_TEST_OPENAI_KEY"
SECRET = "sk-test-not-a-real-key-123"

TOP_K = {  # last user message contains → top_logprobs of the first assistant token
    "prefer A": [(" A", -0.1), ("B", -2.5), ("The", -3.0), ("A", -4.0)],
    "prefer B": [("(B", -0.2), ("A", -1.9), (" B", -2.2)],
    "only A": [("A", -0.05), ("Sure", -3.5)],
    "": [("Sure", -0.1), ("I", -1.0), ("Alpha", -2.0)],
}


class FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall on a kept-alive connection

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self):
        st = self.server.state
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        last = req["messages"][-1]["content"]
        with st["lock"]:
            st["bodies"].append(req)
            st["auth"].append(self.headers.get("Authorization"))
            st["attempts"][last] += 1
            attempt = st["attempts"][last]
            st["in_flight"] += 1
            st["max_in_flight"] = max(st["max_in_flight"], st["in_flight"])
        try:
            reply = self._answer(req, last, attempt)
        finally:  # before the response: once its bytes leave, the client may send the next request
            with st["lock"]:
                st["in_flight"] -= 1
        self._send(*reply)

    def _answer(self, req, last: str, attempt: int) -> tuple:
        """``(status, body[, headers])`` for one request."""
        if self.path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {self.path}"}}
        gate = self.server.state.get("gate")
        if "SLOW" in last and gate is not None and not gate.wait():
            return 400, {"error": {"message": f"gate timed out: {gate}"}}  # 400: the engine does not retry it
        if "HANG" in last:
            time.sleep(1.0)
        if "FAIL400" in last:
            return 400, {"error": {"message": "bad request: you asked for FAIL400"}}
        if "FLAKY429" in last and attempt == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if "FLAKY500" in last and attempt == 1:
            return 500, {"error": {"message": "oops"}}
        if "ALWAYS503" in last:
            return 503, {"error": {"message": "overloaded"}}
        if req.get("logprobs"):
            top = next(v for k, v in TOP_K.items() if k in last)
            content = [{"token": top[0][0], "logprob": top[0][1],
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top][:req["top_logprobs"]]}]
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                                      "logprobs": {"content": content}, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        text = "ECHO: " + last.upper()
        words = text.split()[: req["max_tokens"]]
        prompt_words = sum(len(m["content"].split()) for m in req["messages"])
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                  "finish_reason": "length" if len(words) < len(text.split()) else "stop"}],
                     "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(words)}}


class Gate:
    """Where ``SLOW`` requests wait until the server holds ``n`` of them at once *and* every request
    the engine has started (``engine_started``/``engine_done``, called around ``OpenAIEngine._post``)
    has arrived; then it stays open. An engine that keeps its limit of ``n`` makes the server hold
    exactly ``n`` at once, however fast or slow the machine. One that allows fewer never opens the
    gate: each waiting request answers 400 after ``timeout_s``, failing its row instead of hanging
    the test. One that allows more opens it only once all the requests it has started are in, so
    the server counts them all (missed only if a worker starts after the gate opened)."""

    def __init__(self, n: int, timeout_s: float = 60.0):
        self.n, self.timeout_s = n, timeout_s
        self.cond = threading.Condition()
        self.inside = self.engine_outstanding = 0
        self.opened = False

    def __repr__(self) -> str:
        return (f"Gate(n={self.n}, inside={self.inside}, engine_outstanding={self.engine_outstanding}, "
                f"opened={self.opened})")

    def _update(self, inside: int = 0, engine: int = 0) -> None:
        with self.cond:
            self.inside += inside
            self.engine_outstanding += engine
            if self.inside >= self.n and self.inside == self.engine_outstanding:
                self.opened = True
            self.cond.notify_all()

    def engine_started(self) -> None:
        self._update(engine=+1)

    def engine_done(self) -> None:
        self._update(engine=-1)

    def wait(self) -> bool:
        """Server side: True once the gate is open, False after ``timeout_s``."""
        self._update(inside=+1)
        with self.cond:
            return self.cond.wait_for(lambda: self.opened, timeout=self.timeout_s)

    def watch(self, engine: OpenAIEngine) -> OpenAIEngine:
        """Count ``engine``'s outstanding requests (those it has started and not yet finished)."""
        post = engine._post

        def counted(payload):
            self.engine_started()
            try:
                return post(payload)
            finally:
                self.engine_done()

        engine._post = counted
        return engine


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out and hung up
        pass


@pytest.fixture
def server():
    srv = QuietServer(("127.0.0.1", 0), FakeOpenAI)
    srv.state = {"lock": threading.Lock(), "bodies": [], "auth": [], "attempts": Counter(),
                 "in_flight": 0, "max_in_flight": 0}
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _engine(server, **opts) -> OpenAIEngine:
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    o = replace(OpenAIOptions(base_url=base, api_key_env=KEY_ENV, backoff_s=0.001), **opts)
    return OpenAIEngine(EngineConfig(backend="openai", model="fake-judge", openai=o))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_generate_in_order_with_counts_and_params(server):
    eng = _engine(server)
    assert isinstance(eng, Engine) and eng.name == "openai:fake-judge"
    convs = [_user(f"row {i} says hello") for i in range(6)]
    convs[2] = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "row 2 says hello"}]
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=11, stop=("\n\n",))
    gens = eng.generate(convs, params)
    assert [g.text for g in gens] == [f"ECHO: ROW {i} SAYS" for i in range(6)]
    assert all(g.error is None and g.completion_tokens == 4 and g.finish_reason == "length" for g in gens)
    assert gens[0].prompt_tokens == 4 and gens[2].prompt_tokens == 6
    body = server.state["bodies"][0]
    assert body["model"] == "fake-judge" and body["max_tokens"] == 4 and body["temperature"] == 0.7
    assert body["top_p"] == 0.9 and body["stop"] == ["\n\n"] and isinstance(body["seed"], int)
    assert eng.requests == 6 and eng.retries == 0

    short = eng.generate([_user("hi")], SamplingParams(max_new_tokens=50))
    assert short[0].text == "ECHO: HI" and short[0].finish_reason == "stop"
    assert "seed" not in server.state["bodies"][-1] and "stop" not in server.state["bodies"][-1]


def test_duplicate_rows_get_distinct_seeds_that_do_not_depend_on_the_batch():
    a, b = row_seeds(5, ["x", "y", "x"]), row_seeds(5, ["y", "x"])
    assert a[0] != a[2] and a[0] == b[1] and a[1] == b[0]
    assert row_seeds(None, ["x", "x"]) == [None, None] and row_seeds(6, ["x"]) != row_seeds(5, ["x"])


@pytest.mark.parametrize("max_concurrency, rows", [(4, 8), (1, 3)])
def test_requests_overlap_up_to_max_concurrency(server, max_concurrency, rows):
    gate = server.state["gate"] = Gate(max_concurrency)
    eng = gate.watch(_engine(server, max_concurrency=max_concurrency))
    gens = eng.generate([_user(f"SLOW {i}") for i in range(rows)], SamplingParams(max_new_tokens=8))
    assert [g.error for g in gens] == [None] * rows, gate
    assert [g.text for g in gens] == [f"ECHO: SLOW {i}" for i in range(rows)]
    assert server.state["max_in_flight"] == max_concurrency, gate
    assert eng.requests == rows and eng.retries == 0


def test_429_and_500_are_retried(server):
    eng = _engine(server)
    gens = eng.generate([_user("FLAKY429 a"), _user("plain"), _user("FLAKY500 b")], SamplingParams())
    assert [g.error for g in gens] == [None, None, None]
    assert gens[0].text == "ECHO: FLAKY429 A" and gens[2].text == "ECHO: FLAKY500 B"
    assert server.state["attempts"]["FLAKY429 a"] == 2 and server.state["attempts"]["FLAKY500 b"] == 2
    assert eng.retries == 2 and eng.requests == 5


def test_400_fails_only_its_row_without_retry(server):
    eng = _engine(server)
    gens = eng.generate([_user("ok one"), _user("FAIL400 please"), _user("ok two")], SamplingParams())
    assert gens[0].text == "ECHO: OK ONE" and gens[2].text == "ECHO: OK TWO"
    assert gens[1].error.startswith("http_400:") and "you asked for FAIL400" in gens[1].error
    assert gens[1].text == "" and gens[1].finish_reason == "error"
    assert server.state["attempts"]["FAIL400 please"] == 1 and eng.retries == 0


def test_retries_exhausted_fail_the_row(server):
    eng = _engine(server, max_retries=2)
    gens = eng.generate([_user("ALWAYS503"), _user("fine")], SamplingParams())
    assert gens[0].error.startswith("http_503:") and "gave up after 3 attempts" in gens[0].error
    assert gens[1].error is None and server.state["attempts"]["ALWAYS503"] == 3 and eng.retries == 2


def test_timeout_and_connection_errors_fail_the_row(server):
    gens = _engine(server, timeout_s=0.2, max_retries=1).generate([_user("HANG")], SamplingParams())
    assert gens[0].error.startswith("timeout:"), gens[0].error
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    o = OpenAIOptions(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.001)
    eng = OpenAIEngine(EngineConfig(backend="openai", model="m", openai=o))
    gens = eng.generate([_user("x")], SamplingParams())
    assert gens[0].error.startswith("connection_error:") and eng.requests == 2 and eng.retries == 1
    assert all(math.isnan(v) for v in eng.choice_logprobs([_user("x")], ["A", "B"])[0])


def test_api_key_comes_from_the_environment_only(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    eng = make_engine(EngineConfig(backend="openai", model="fake-judge",
                                   openai=OpenAIOptions(base_url=_engine(server).opts.base_url, api_key_env=KEY_ENV)))
    eng.generate([_user("hi")], SamplingParams())
    assert server.state["auth"][-1] == f"Bearer {SECRET}"
    assert SECRET not in repr(eng) and SECRET not in repr(eng.cfg) and SECRET not in str(vars(eng))
    monkeypatch.delenv(KEY_ENV)
    eng.generate([_user("hi")], SamplingParams())
    assert server.state["auth"][-1] is None
    with pytest.raises(EngineError, match="NAME of an environment variable") as e:
        OpenAIEngine(EngineConfig(backend="openai", openai=OpenAIOptions(api_key_env=SECRET)))
    assert SECRET not in str(e.value)


def test_choice_logprobs_from_top_logprobs(server):
    eng = _engine(server, top_logprobs=5)
    convs = [_user("judge: prefer A"), _user("judge: prefer B"), _user("judge: only A"),
             _user("judge: say nothing useful"), _user("FAIL400 judge")]
    rows = eng.choice_logprobs(convs, ["A", "B"])
    assert rows[0] == [-0.1, -2.5]  # " A" (-0.1) beats "A" (-4.0): the max over matching tokens
    assert rows[1] == [-1.9, -0.2]  # "(B" counts as B
    assert rows[2] == [-0.05, -math.inf]  # B outside the top-k
    assert all(math.isnan(v) for v in rows[3]) and all(math.isnan(v) for v in rows[4])
    body = server.state["bodies"][0]
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 5
    with pytest.raises(EngineError):
        eng.choice_logprobs(convs, [])


def test_matching_rule_and_retry_delay():
    assert all(choice_matches(t, "A") for t in ["A", " A", "(A", "A)", "(A)", "\nA "])
    assert not any(choice_matches(t, "A") for t in ["a", "Alpha", "B", "", "(", " "])
    assert match_choices([("A", -9999.0), ("B", -1.0)], ["A", "B"]) == [-math.inf, -1.0]
    assert all(math.isnan(v) for v in match_choices([], ["A", "B"]))
    assert retry_delay(0, 1.0, "3") == 3.0 and retry_delay(0, 1.0, "9999") == 30.0
    assert 4.0 <= retry_delay(2, 1.0) <= 5.0 and retry_delay(20, 1.0) == 30.0
    assert 1.0 <= retry_delay(0, 1.0, "not a date") <= 1.25
    assert retry_delay(0, 1.0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_bad_config_is_rejected():
    with pytest.raises(EngineError, match="base_url"):
        OpenAIEngine(EngineConfig(backend="openai", openai=OpenAIOptions(base_url="localhost:8000")))
    with pytest.raises(EngineError, match="max_concurrency"):
        OpenAIEngine(EngineConfig(backend="openai", openai=OpenAIOptions(max_concurrency=0)))
