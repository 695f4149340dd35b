"""`cai serve` under fuzzing: hundreds of generated HTTP requests — valid and broken fields, wrong
types and sizes, bodies that are not JSON or too big, other content types, methods and paths — sent
to a real Ray Serve app. None may answer a 5xx, every refusal is an OpenAI-style error, and the
server still answers a good request afterwards."""
from __future__ import annotations

import json
from collections import Counter
from urllib.parse import quote

import pytest

from ray_cluster import free_ports

requests = pytest.importorskip("requests")
hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = 500
MAX_BODY = 16 * 1024  # small limits, so that going over them is cheap
MAX_MESSAGES = 8
MAX_MODEL_LEN = 256  # the default max_tokens (256) never fits: only requests asking for 1-2 tokens generate
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def base_url(ray_local, tiny_llama_dir):
    from ray import serve

    from cluster.serve.app import start
    from cluster.serve.config import ServeConfig

    port = free_ports(1)[0]
    cfg = ServeConfig.from_args({"model": str(tiny_llama_dir), "model_name": "tiny", "port": port,
                                 "max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_body_bytes": MAX_BODY,
                                 "max_messages": MAX_MESSAGES, "engine": {"max_model_len": MAX_MODEL_LEN}})
    url = start(cfg)
    try:
        yield url.removesuffix("/v1")
    finally:
        serve.shutdown()


# ---------------------------------------------------------------- strategies
def weighted(*choices) -> st.SearchStrategy:
    """One of the strategies, ``(weight, strategy)``, drawn in proportion to its weight."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


def _maybe(key: str, values, weight: int = 3) -> st.SearchStrategy:
    """Mostly nothing, else ``{key: value}``: a request holds a few odd fields, not all of them at once."""
    return weighted((weight, st.just({})), (1, values.map(lambda v: {key: v})))


texts = st.text(max_size=40) | st.sampled_from(["", " ", "hi", "Say hello.", "\x00", "é😀", "{{ x }}", "<|im_end|>"])
# JSON's "\ud800": a lone surrogate, which no tokenizer takes
surrogates = st.sampled_from(["a\ud800", "\udfff", "x\ud83d"])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
huge_ints = st.sampled_from([2**63, 2**64, -2**63 - 1, 10**30, -(10**30)])
numbers = (st.integers(-5, 5) | st.floats(-3, 3, allow_nan=False) | huge_ints | st.booleans() | st.none()
           | st.sampled_from(["1", "0.5", [], {}]))

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts | surrogates})
other_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", 1]),
                                              "image_url": st.just({"url": "http://x/y.png"})}),
                       st.fixed_dictionaries({"type": st.just("text"), "text": scalars}), scalars)
contents = weighted((3, texts), (1, surrogates), (1, st.lists(text_part, max_size=3)),
                    (1, st.lists(text_part | other_part, min_size=1, max_size=3)), (1, scalars), (1, json_values))
roles = weighted((4, st.sampled_from(["user", "system", "assistant", "developer"])),
                 (1, st.sampled_from(["tool", "wizard", "", "USER"])), (1, scalars))
message = weighted(
    (3, st.fixed_dictionaries({"role": roles, "content": contents})),
    (1, st.fixed_dictionaries({"role": roles})), (1, st.fixed_dictionaries({"content": contents})), (1, scalars))
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                "content": texts}), min_size=1, max_size=3).map(
    lambda m: m + [{"role": "user", "content": "Say hello."}])
messages = weighted(
    (8, good_messages), (3, st.lists(message, max_size=4)),
    (1, st.lists(st.just({"role": "user", "content": "hi"}), min_size=MAX_MESSAGES + 1, max_size=MAX_MESSAGES + 3)),
    (1, st.just([{"role": "user", "content": "x" * (32 * MAX_MODEL_LEN + 1)}])),  # too many characters
    (1, scalars), (1, json_values))
stops = weighted((2, texts), (2, st.lists(texts, max_size=6)), (1, st.just("s" * 300)),
                 (1, st.lists(st.just("t" * 257), min_size=1, max_size=2)), (1, scalars),
                 (1, st.lists(scalars, max_size=3)))
stream_options = weighted((2, st.fixed_dictionaries({"include_usage": st.booleans()})),
                          (1, st.fixed_dictionaries({"include_usage": scalars})),
                          (1, st.dictionaries(st.text(max_size=5), scalars, max_size=2)), (1, scalars),
                          (1, json_values))
small_tokens = st.sampled_from([1, 2])

fields = st.tuples(
    _maybe("model", st.sampled_from(["tiny", "", None, "gpt-4o", 1, [], {"a": 1}])),
    messages.map(lambda m: {"messages": m}),
    weighted((4, small_tokens.map(lambda n: {"max_tokens": n})),
             (2, small_tokens.map(lambda n: {"max_completion_tokens": n})),
             (1, st.just({})),  # the default max_tokens: no room for it (max_model_len), a 400
             (1, (numbers | st.sampled_from([0, 257, 10**9, 1.0, "2"])).map(lambda v: {"max_tokens": v})),
             (1, numbers.map(lambda v: {"max_completion_tokens": v}))),
    _maybe("temperature", numbers | st.sampled_from([0, 0.7, 2, 2.5, -0.1]), weight=2),
    _maybe("top_p", numbers | st.sampled_from([0, 0.5, 1, 1.5])),
    _maybe("seed", numbers | st.integers() | huge_ints),
    _maybe("n", numbers | st.sampled_from([1, 2, 1.0, True])),
    _maybe("stop", stops),
    _maybe("stream", st.booleans() | scalars, weight=1),
    _maybe("stream_options", stream_options),
    _maybe("frequency_penalty", numbers, weight=5),
    _maybe("presence_penalty", numbers, weight=5),
    _maybe("logprobs", st.booleans() | scalars, weight=5),
    _maybe("top_logprobs", numbers, weight=5),
    _maybe("repetition_penalty", numbers, weight=5),
    weighted((3, st.just({})), (1, st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2))),
).map(lambda parts: {k: v for part in reversed(parts) for k, v in part.items()})  # messages: ours, not an extra's


def _encode(body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes


bodies = weighted(
    (12, fields.map(_encode)),
    (1, json_values.map(_encode)),  # JSON, but not an object
    (1, st.binary(max_size=200)),  # not JSON (or not UTF-8)
    (1, fields.map(_encode).flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda k: b[:k]))),  # cut
    (1, st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,  # nested deep
                         b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}',
                         b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"])),
    (1, st.integers(MAX_BODY + 1, 3 * MAX_BODY).map(lambda n: b'{"messages": "' + b"a" * n + b'"}')),  # too big
)
json_types = st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8",
                              "APPLICATION/JSON"])
content_types = weighted(
    (3, json_types),
    (2, st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/jsonx", ""])),
    (1, st.none()),
    (1, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)))  # a header
paths = weighted((2, st.sampled_from(["/v1/models", "/", "/v1", "/v1/chat", CHAT + "/", CHAT + "/x",
                                      "/v1/completions", "/docs", "/openapi.json", "//v1/chat/completions",
                                      "/v1/models/tiny"])),
                 (1, st.text(max_size=20).map(lambda t: "/" + quote(t))), (1, st.just(CHAT)))
methods = st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
chat_requests = st.fixed_dictionaries({"method": st.just("POST"), "path": st.just(CHAT), "content_type": json_types,
                                       "body": bodies, "chunked": st.booleans()})
any_requests = st.fixed_dictionaries({"method": methods, "path": paths | st.just(CHAT), "content_type": content_types,
                                      "body": bodies, "chunked": st.booleans()})
requests_ = weighted((3, chat_requests), (1, any_requests))


def _send(session, base: str, r: dict):
    headers = {} if r["content_type"] is None else {"Content-Type": r["content_type"]}
    body = r["body"]
    data = iter([body[i:i + 4096] for i in range(0, len(body), 4096)] or [b""]) if r["chunked"] else body
    return session.request(r["method"], base + r["path"], data=data, headers=headers, timeout=120)


def _check(resp, r: dict) -> None:
    what = f"{r['method']} {r['path']} ({r['content_type']!r}, {len(r['body'])} bytes): {resp.status_code}"
    assert resp.status_code < 500, f"{what} {resp.text[:500]}"
    text = resp.text
    assert "Traceback" not in text and "server_error" not in text, f"{what} {text[:500]}"
    if resp.status_code >= 400 and r["method"] != "HEAD":
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], f"{what} {text[:500]}"
        assert set(error) >= {"message", "type", "param", "code"}


def test_no_generated_request_gets_a_5xx_and_the_server_keeps_serving(base_url):
    session = requests.Session()
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                     HealthCheck.filter_too_much])
    @given(r=requests_)
    def one(r):
        resp = _send(session, base_url, r)
        _check(resp, r)
        statuses[resp.status_code] += 1

    one()
    print(f"statuses of {sum(statuses.values())} generated requests: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= EXAMPLES
    # the requests reached every layer: generation, validation, the body and content-type checks, routing
    assert {200, 400, 404, 405, 413, 415} <= set(statuses), statuses
    ok = session.post(base_url + CHAT, json={"messages": [{"role": "user", "content": "Say hello."}],
                                             "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
