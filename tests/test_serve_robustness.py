"""`cai serve` against bad input and bad luck, over real HTTP to a real Ray Serve app (tiny model):
every malformed or oversized request is an OpenAI-style 4xx naming the field, and the server keeps
serving; a genuine fault is a 500 with a request id and no exception text; a client that goes away
stops costing tokens."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from ray_cluster import free_ports

requests = pytest.importorskip("requests")

MAX_BODY = 256 * 1024  # the server's limits, set through ServeConfig (defaults: 1 MiB, 256, 32 per token)
MAX_MESSAGES = 16
MAX_PROMPT_CHARS = 20_000
SECRET = "secret-canary-5be1"  # a fault's exception text: in the server's log, never in a response
HELLO = [{"role": "user", "content": "Say hello."}]
GOOD = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
CHAT = "/v1/chat/completions"


def _faulty_class():
    """ChatModel with faults on cue: COUNT-FAULT in the last message raises while counting tokens,
    ENGINE-FAULT raises in the engine; LOOP-CHECK fails unless counting runs off the event loop;
    TEMPLATE-REFUSES makes the chat template refuse the conversation, as some templates do."""
    from cluster.serve.app import ChatModel

    class Faulty(ChatModel.func_or_class):
        async def __init__(self, *args, **kwargs):  # a Serve ingress class's __init__ is async
            await super().__init__(*args, **kwargs)
            real = self.engine.generate

            def generate(conversations, params, **extra):
                if any("ENGINE-FAULT" in c[-1]["content"] for c in conversations):
                    raise RuntimeError(SECRET)
                return real(conversations, params, **extra)

            self.engine.generate = generate
            count = self.engine.count_tokens

            def count_tokens(conversation):
                if "TEMPLATE-REFUSES" in conversation[-1]["content"]:
                    from jinja2.exceptions import TemplateError

                    raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
                return count(conversation)

            self.engine.count_tokens = count_tokens

        def _count(self, req):
            last = req.conversation[-1]["content"]
            if "COUNT-FAULT" in last:
                raise RuntimeError(SECRET)
            if "LOOP-CHECK" in last:
                try:
                    asyncio.get_running_loop()
                except RuntimeError:
                    pass  # no event loop in this thread: counting is off the loop
                else:
                    raise RuntimeError("tokens were counted on the event loop")
            return super()._count(req)

    return Faulty


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama_dir):
    """``cai``'s app at ``/`` and a fault-injecting copy of it at ``/faulty``."""
    from ray import serve

    from cluster.serve.app import start
    from cluster.serve.config import ServeConfig

    port = free_ports(1)[0]
    cfg = ServeConfig.from_args({"model": str(tiny_llama_dir), "model_name": "tiny", "port": port,
                                 "max_batch_size": 4, "batch_wait_timeout_s": 0.05, "max_body_bytes": MAX_BODY,
                                 "max_messages": MAX_MESSAGES, "max_prompt_chars": MAX_PROMPT_CHARS,
                                 "engine": {"max_model_len": 2048}})
    base = start(cfg).removesuffix("/v1")
    faulty = serve.deployment(_faulty_class(), name="Faulty", ray_actor_options={"num_cpus": 0.5})
    serve.run(faulty.bind(engine=cfg.engine_config(), model_name="tiny"), name="faulty", route_prefix="/faulty")
    try:
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


def _post(http, url: str, body, content_type: str | None = "application/json", **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return http.post(url, data=data, headers={**headers, **kw.pop("headers", {})}, timeout=120, **kw)


def _assert_good_request_answers(http, base: str) -> None:
    r = _post(http, base + CHAT, GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def _assert_openai_error(r, status: int, param) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param, error
    assert "Traceback" not in r.text and "Error:" not in r.text
    return error


# ---------------------------------------------------------------- bad bodies, field by field
M = HELLO
BAD = [  # (id, body, status, param)
    # the three: a 500, a 500 with the exception's text, a stop string the size of a book
    ("stream-options-a-string", {**GOOD, "stream": True, "stream_options": "x"}, 400, "stream_options"),
    ("seed-2**64", {**GOOD, "seed": 2**64}, 400, "seed"),
    ("stop-100k-chars", {**GOOD, "stop": "x" * 100_000}, 400, "stop"),
    ("stream-options-usage-a-string", {**GOOD, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("seed-2**63", {**GOOD, "seed": 2**63}, 400, "seed"),
    ("seed-below-int64", {**GOOD, "seed": -2**63 - 1}, 400, "seed"),
    ("seed-bool", {**GOOD, "seed": True}, 400, "seed"),
    ("seed-float", {**GOOD, "seed": 1.5}, 400, "seed"),
    ("five-stops", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop-257-chars", {**GOOD, "stop": ["ok", "y" * 257]}, 400, "stop"),
    ("stop-a-number", {**GOOD, "stop": 0}, 400, "stop"),
    ("stop-list-of-numbers", {**GOOD, "stop": [1]}, 400, "stop"),
    ("n-2", {**GOOD, "n": 2}, 400, "n"),
    ("n-bool", {**GOOD, "n": True}, 400, "n"),
    ("n-float", {**GOOD, "n": 1.0}, 400, "n"),
    ("max-tokens-bool", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("max-tokens-0", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-string", {**GOOD, "max_tokens": "2"}, 400, "max_tokens"),
    ("max-tokens-over-model", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    ("max-completion-tokens-negative", {**GOOD, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("temperature-string", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("temperature-bool", {**GOOD, "temperature": True}, 400, "temperature"),
    ("temperature-2.5", {**GOOD, "temperature": 2.5}, 400, "temperature"),
    ("top-p-0", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top-p-1.5", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("frequency-penalty-3", {**GOOD, "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("presence-penalty-string", {**GOOD, "presence_penalty": "x"}, 400, "presence_penalty"),
    ("logprobs", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("top-logprobs-30", {**GOOD, "top_logprobs": 30}, 400, "top_logprobs"),
    ("stream-a-string", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("model-a-number", {**GOOD, "model": 5}, 400, "model"),
    ("model-unknown", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("no-messages", {**GOOD, "messages": []}, 400, "messages"),
    ("messages-a-string", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("too-many-messages", {**GOOD, "messages": M * (MAX_MESSAGES + 1)}, 400, "messages"),
    ("too-many-characters", {**GOOD, "messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}]}, 400,
     "messages"),
    ("message-not-an-object", {**GOOD, "messages": [*M, "hi"]}, 400, "messages[1]"),
    ("unknown-role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("role-a-number", {**GOOD, "messages": [{"role": 1, "content": "hi"}]}, 400, "messages[0].role"),
    ("content-a-number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("content-missing", {**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("image-part", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, 400, "messages[0].content"),
    ("text-part-not-text", {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, 400,
     "messages[0].content"),
    ("lone-surrogate", {**GOOD, "messages": [{"role": "user", "content": "a\ud800"}]}, 400, "messages[0].content"),
    ("last-is-assistant", {**GOOD, "messages": [*M, {"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("body-a-list", [GOOD], 400, None),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_field_is_a_4xx_naming_it_and_the_server_keeps_serving(server, http, body, status, param):
    _assert_openai_error(_post(http, server + CHAT, body), status, param)
    _assert_good_request_answers(http, server)


def test_the_prompt_is_measured_in_characters_before_it_is_tokenized(server, http):
    body = {**GOOD, "messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}]}
    error = _assert_openai_error(_post(http, server + CHAT, body), 400, "messages")
    assert f"{MAX_PROMPT_CHARS + 1} characters" in error["message"] and str(MAX_PROMPT_CHARS) in error["message"]


@pytest.mark.parametrize("raw", [
    b"{not json", b"", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
], ids=["broken", "empty", "not-utf8", "nested-100k-deep", "nan", "5000-digit-integer"])
def test_a_body_that_is_not_json_is_a_400(server, http, raw):
    error = _assert_openai_error(_post(http, server + CHAT, raw), 400, None)
    assert error["code"] == "invalid_json"
    _assert_good_request_answers(http, server)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_a_body_that_is_not_declared_json_is_a_415(server, http, content_type):
    error = _assert_openai_error(_post(http, server + CHAT, GOOD, content_type), 415, "Content-Type")
    assert error["code"] == "unsupported_media_type"
    assert _post(http, server + CHAT, GOOD, "application/json; charset=utf-8").status_code == 200


def _too_big() -> bytes:
    body = json.dumps({**GOOD, "messages": [{"role": "user", "content": "a" * MAX_BODY}]}).encode()
    assert len(body) > MAX_BODY
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413_however_it_is_sent(server, http, chunked):
    body = _too_big()
    data = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    r = http.post(server + CHAT, data=data, headers={"Content-Type": "application/json"}, timeout=120)
    error = _assert_openai_error(r, 413, None)
    assert error["code"] == "request_too_large" and str(MAX_BODY) in error["message"]
    _assert_good_request_answers(http, server)


def test_unknown_routes_and_methods_stay_404_and_405(server, http):
    _assert_openai_error(http.get(server + "/v1/nothing-here", timeout=60), 404, None)
    _assert_openai_error(http.post(server + "/v1/completions", json=GOOD, timeout=60), 404, None)
    r = http.delete(server + CHAT, timeout=60)
    _assert_openai_error(r, 405, None)
    assert "POST" in r.headers["allow"]
    _assert_openai_error(http.post(server + "/v1/models", timeout=60), 405, None)
    _assert_good_request_answers(http, server)


# ---------------------------------------------------------------- genuine faults
def _replica_logs(app: str) -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in logs.glob(f"replica_{app}_*.log"))


def _assert_logged(request_id: str) -> None:
    """The replica logged the fault under the request id, its traceback and text right after."""
    def logged() -> bool:
        lines = _replica_logs("faulty").splitlines()
        starts = [i for i, line in enumerate(lines) if f"request {request_id}: " in line or
                  (f"requests {request_id}" in line and "engine failed" in line)]
        return any("Traceback" in "\n".join(lines[i:i + 80]) and SECRET in "\n".join(lines[i:i + 80])
                   for i in starts)

    for _ in range(100):  # Serve's log handler may lag a moment behind the response
        if logged():
            return
        time.sleep(0.1)
    raise AssertionError(f"no traceback logged for request {request_id}")


def _assert_server_error(r, code: str, request_id: str | None = None) -> str:
    assert r.status_code == 500 and SECRET not in r.text and "Traceback" not in r.text, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == code
    assert error["request_id"] == r.headers["x-request-id"]  # one header, the id the body quotes
    if request_id is not None:
        assert error["request_id"] == request_id
    assert error["request_id"] in error["message"]
    return error["request_id"]


def test_a_fault_is_a_500_with_a_request_id_and_no_exception_text(server, http):
    url = server + "/faulty" + CHAT
    body = {**GOOD, "messages": [{"role": "user", "content": "COUNT-FAULT"}]}
    _assert_logged(_assert_server_error(_post(http, url, body), "internal_error"))
    # a request id the client sent is the one quoted (and logged)
    theirs = "client-chosen-id-42"
    _assert_server_error(_post(http, url, body, headers={"x-request-id": theirs}), "internal_error", theirs)
    _assert_logged(theirs)
    assert _post(http, url, GOOD).status_code == 200


def test_an_engine_fault_is_a_500_with_a_request_id_streamed_or_not(server, http):
    url = server + "/faulty" + CHAT
    body = {**GOOD, "messages": [{"role": "user", "content": "ENGINE-FAULT"}]}
    _assert_logged(_assert_server_error(_post(http, url, body), "generation_failed"))
    r = _post(http, url, {**body, "stream": True})
    assert r.status_code == 200 and SECRET not in r.text and "Traceback" not in r.text
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["request_id"] == r.headers["x-request-id"]
    _assert_logged(error["request_id"])
    assert _post(http, url, GOOD).status_code == 200


def test_a_conversation_the_chat_template_refuses_is_a_400(server, http):
    body = {**GOOD, "messages": [{"role": "user", "content": "TEMPLATE-REFUSES"}]}
    error = _assert_openai_error(_post(http, server + "/faulty" + CHAT, body), 400, "messages")
    assert error["code"] == "invalid_conversation" and "must alternate" in error["message"]


def test_tokens_are_counted_off_the_event_loop(server, http):
    body = {**GOOD, "messages": [{"role": "user", "content": "LOOP-CHECK"}]}
    r = _post(http, server + "/faulty" + CHAT, body)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- a client that goes away
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
        "temperature": 0}


def _stats() -> dict:
    from ray import serve

    return serve.get_app_handle("cai").stats.remote().result()


def test_a_finished_generation_counts_every_token(server, http):
    """The control for the two tests below: left alone, LONG decodes all its max_tokens."""
    before = _stats()
    r = _post(http, server + CHAT, LONG)
    assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert _stats()["decoded_tokens"] - before["decoded_tokens"] == LONG["max_tokens"]


def post_raw(base: str, body: dict, headers: dict | None = None) -> socket.socket:
    """``body`` POSTed to the chat route over a raw socket (so a test can hang up mid-answer); the socket."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=120)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _leave_midway(base: str, body: dict) -> tuple[int, int]:
    """Send ``body``, wait until the engine decodes it, hang up. Returns (tokens it decoded,
    requests the replica counted as cancelled) once its batch is over."""
    before = _stats()
    sock = post_raw(base, body)
    try:
        if body.get("stream"):
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
        for _ in range(6000):  # until the engine is decoding this request
            if _stats()["decoded_tokens"] > before["decoded_tokens"]:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the request never started decoding")
    finally:
        sock.close()
    # batches run one at a time: once this one is answered, the one we left has ended
    r = requests.post(base + CHAT, json={**GOOD, "max_tokens": 1}, timeout=120)
    assert r.status_code == 200, r.text
    after = _stats()
    return (after["decoded_tokens"] - before["decoded_tokens"] - 1,
            after["cancelled"] - before["cancelled"])


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_client_that_hangs_up_stops_its_generation(server, stream):
    decoded, cancelled = _leave_midway(server, {**LONG, "stream": stream})
    print(f"{'streaming' if stream else 'non-streaming'} client hung up: {decoded} of "
          f"{LONG['max_tokens']} tokens decoded")
    assert cancelled == 1
    assert 0 < decoded < LONG["max_tokens"] // 4


# ---------------------------------------------------------------- the engine's side of cancelling
@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from actors.config import EngineConfig
    from actors.hf_engine import TransformersEngine

    return TransformersEngine(EngineConfig(model=str(tiny_llama_dir), max_model_len=512, batch_size=4,
                                           torch_threads=1))


def test_engine_ends_a_row_should_stop_names_and_stops_when_all_have_ended(engine):
    from actors.base import SamplingParams

    convs = [[{"role": "user", "content": f"Count to {i}."}] for i in range(3)]
    params = SamplingParams(max_new_tokens=60)
    alone = engine.generate(convs, params)
    assert [g.completion_tokens for g in alone] == [60, 60, 60]  # no row ends by itself early
    steps = [0, 0, 0]

    def on_tokens(row, ids):
        steps[row] += len(ids)

    gens = engine.generate(convs, params, on_tokens=on_tokens, should_stop=lambda row: row == 1 and steps[1] >= 5)
    assert [g.error for g in gens] == [None, "cancelled", None]
    assert [g.text for g in gens[::2]] == [g.text for g in alone[::2]]  # the others are untouched
    steps = [0, 0, 0]
    gens = engine.generate(convs, params, on_tokens=on_tokens, should_stop=lambda row: steps[row] >= 5)
    assert [g.error for g in gens] == ["cancelled"] * 3
    assert steps[0] == steps[1] == steps[2] <= 6  # decoding ended within a step of every row's end
    steps = [0, 0, 0]
    gens = engine.generate(convs, params, on_tokens=on_tokens, should_stop=lambda row: True)
    assert [g.error for g in gens] == ["cancelled"] * 3 and steps == [0, 0, 0]  # nothing ran


# ---------------------------------------------------------------- configuration
def test_limits_are_settings_of_cai_serve(monkeypatch, tiny_llama_dir):
    import argparse

    import cluster.cli
    from cluster.cli import register
    from cluster.serve import app
    from cluster.serve import config as sc
    from workflows.core.errors import ConfigError

    assert (sc.ServeConfig().max_body_bytes, sc.ServeConfig().max_messages) == (1 << 20, 256)
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    seen = {}

    def start(cfg):
        seen["cfg"] = cfg
        return "http://127.0.0.1:1/v1"

    monkeypatch.setattr(cluster.cli, "connect", lambda cfg: None)
    monkeypatch.setattr(app, "start", start)
    monkeypatch.setattr(app, "wait_until_interrupted", lambda url, name: None)
    args = sub.choices["serve"].parse_args([str(tiny_llama_dir), "--max-body-bytes", "4096", "--max-messages", "3",
                                            "--max-prompt-chars", "100"])
    assert args.fn(args) == 0
    cfg = seen["cfg"]
    assert (cfg.max_body_bytes, cfg.max_messages, cfg.max_prompt_chars) == (4096, 3, 100)
    kwargs = app.application(cfg)._bound_deployment.init_kwargs
    assert (kwargs["max_body_bytes"], kwargs["max_messages"], kwargs["max_prompt_chars"]) == (4096, 3, 100)
    for field, value in [("max_body_bytes", 10), ("max_messages", 0), ("max_prompt_chars", 0)]:
        with pytest.raises(ConfigError, match=field):
            sc.ServeConfig.from_args({field: value})
