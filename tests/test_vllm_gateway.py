"""`cai serve --backend vllm --server ray-llm`: Ray's own LLMServer (vLLM's async engine, the embedded
model) behind our gateway, over real HTTP with the official `openai` client: answers and token-by-token
streams, concurrent requests, the bearer key, every limit and bad field a 4xx naming it, a prompt
longer than the model a 400, and a client that hangs up stops vLLM decoding its request. Skipped with
the reason where vLLM cannot run."""
from __future__ import annotations

import concurrent.futures as cf
import time

import pytest
from conftest import vllm_skip_reason
from test_cluster_serve import serve_app
from test_serve_robustness import post_raw
from test_vllm_serve import HELLO, answer_and_stream

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))

KEY_ENV, KEY = "CAI_GATEWAY_TEST_KEY", "sk-gateway-canary-31"
LONG = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a very long story about a ship."}],
        "max_tokens": 1500, "temperature": 0}
MAX_MODEL_LEN, MAX_BODY = 2048, 64 * 1024


@pytest.fixture(scope="module")
def server(ray_local):
    yield from serve_app({"model": "embedded", "model_name": "tiny", "server": "ray-llm", "api_key_env": KEY_ENV,
                          "max_batch_size": 8, "max_body_bytes": MAX_BODY,
                          "engine": {"backend": "vllm", "max_model_len": MAX_MODEL_LEN}}, (KEY_ENV, KEY))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _stats() -> dict:
    from ray import serve

    return serve.get_app_handle("cai").stats.remote().result()


def test_a_completion_and_its_stream_token_by_token(client):
    whole, chunks = answer_and_stream(client)
    assert whole.model == "tiny" and whole.choices[0].finish_reason in ("stop", "length")
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


def test_sampling_settings_reach_vllm(client):
    """A stop string ends the answer before it; the same seed gives the same sampled answer."""
    free = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    words = free.choices[0].message.content.split()
    assert len(words) > 3
    stopped = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                             stop=[words[2]])
    assert words[2] not in stopped.choices[0].message.content.split()
    sampled = [client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_eight_concurrent_requests_are_all_answered(client):
    def ask(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}],
                                              max_tokens=8, temperature=0).choices[0].message.content

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(2, 10)))
    assert len(answers) == 8 and all(answers)


def test_the_key_and_the_models_route(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    bad = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "tiny", "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": MAX_MODEL_LEN + 1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": HELLO, "n": 2}, 400, "n"),
    ({"model": "other", "messages": HELLO}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}, 413, None),
], ids=["type", "role", "max-tokens", "n", "model", "body-size"])
def test_bad_requests_are_4xx_naming_the_field(server, body, status, param):
    r = requests.post(server + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_prompt_longer_than_the_model_is_a_400_from_vllm_passed_on(server, client):
    words = " ".join(["sea"] * (MAX_MODEL_LEN + 200))  # fewer characters than the prompt limit, too many tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words}], max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices  # still serving


def _leave_midway(base: str, body: dict) -> dict:
    """Send ``body``; once the model server is working on it (decoding a stream, or holding the
    request), hang up; then wait until the model server counts the request cancelled or done.
    Returns the change of each counter, and vLLM's unfinished requests at the end."""
    before = _stats()
    sock = post_raw(base.removesuffix("/v1"), body, {"Authorization": f"Bearer {KEY}"})
    try:
        if body.get("stream"):
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        for _ in range(6000):
            now = _stats()
            if now["decoded_tokens"] > before["decoded_tokens"] or (not body.get("stream") and now["running"]):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the request never reached the model server")
        time.sleep(1.0)  # let it decode a while
    finally:
        sock.close()
    for _ in range(300):  # the cancellation travels gateway → handle → LLMServer → vLLM's abort
        after = _stats()
        ended = ("cancelled", "failed", "requests")
        if sum(after[k] for k in ended) > sum(before[k] for k in ended) and not after["unfinished"]:
            break
        time.sleep(0.1)
    return {**{k: after[k] - before[k] for k in ("decoded_tokens", "cancelled", "failed", "requests")},
            "unfinished": after["unfinished"]}


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_client_that_hangs_up_stops_its_vllm_generation(server, stream):
    """Streaming: vLLM decoded a few of LONG's 1500 tokens, then nothing more. Not streaming: the
    LLMServer call ended without an answer — cancelled, or ended by vLLM's abort — and vLLM holds
    no request after it (a full answer takes over a minute on a CPU; the check waits at most 30 s)."""
    got = _leave_midway(server, {**LONG, "stream": stream})
    print(f"client hung up ({'streaming' if stream else 'not streaming'}): {got}")
    assert got["cancelled"] + got["failed"] == 1 and got["requests"] == 0 and got["unfinished"] == 0
    if stream:
        assert 0 < got["decoded_tokens"] < LONG["max_tokens"] // 4

