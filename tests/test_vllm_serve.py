"""`cai serve --backend vllm`: the official `openai` client against our Ray Serve app on vLLM
(the embedded model, for real text): answers, token-by-token streaming, one batch for concurrent
requests, and a client that hangs up stops its generation. Skipped with the reason where vLLM
cannot run."""
from __future__ import annotations

import pytest
from conftest import vllm_skip_reason
from test_cluster_serve import ask_together, serve_app
from test_serve_robustness import LONG, _leave_midway

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))

HELLO = [{"role": "user", "content": "Write two sentences about the sea."}]


@pytest.fixture(scope="module")
def server(ray_local):
    yield from serve_app({"model": "embedded", "model_name": "tiny", "server": "cai",  # our app (the gateway's:
                          "max_batch_size": 4, "batch_wait_timeout_s": 0.5,    # test_vllm_gateway.py)
                          "engine": {"backend": "vllm", "max_model_len": 2048}})


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def answer_and_stream(client):
    """The same greedy request whole and streamed: the stream's pieces make the whole answer, arrive
    token by token (not one block at the end) and end with the same usage. (answer, chunks)."""
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=32, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 32
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    assert len(pieces) > 5
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    return whole, chunks


def test_a_completion_and_its_stream_token_by_token(client):
    whole, chunks = answer_and_stream(client)
    assert whole.model == "tiny" and whole.choices[0].finish_reason in ("stop", "length")
    assert len(chunks) > whole.usage.completion_tokens // 2  # many chunks, not one block at the end


def test_four_concurrent_requests_are_one_vllm_batch(client):
    results = ask_together(client)
    assert [size for size, _ in results] == [4, 4, 4, 4] and all(text for _, text in results)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_client_that_hangs_up_stops_its_vllm_generation(server, stream):
    decoded, cancelled = _leave_midway(server.removesuffix("/v1"), {**LONG, "stream": stream})
    assert cancelled == 1 and 0 < decoded < LONG["max_tokens"] // 4
