"""`cai serve`: the official `openai` client against our Ray Serve app on 127.0.0.1 (tiny model)."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.chaos_harness import ctrl_c_reaches
from ray_cluster import free_ports

openai = pytest.importorskip("openai")

KEY_ENV = "CAI_TEST_SERVE_KEY"


def serve_app(args: dict, key: tuple[str, str] | None = None):
    """Our Serve application from ServeConfig ``args`` on a free port, the bearer key ``(variable,
    value)`` in the environment while it runs: yields its base URL, then shuts Serve down."""
    from ray import serve

    from cluster.serve.app import start
    from cluster.serve.config import ServeConfig

    if key:
        os.environ[key[0]] = key[1]
    try:
        yield start(ServeConfig.from_args({"port": free_ports(1)[0], **args}))
    finally:
        serve.shutdown()
        if key:
            os.environ.pop(key[0], None)


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama_dir):
    yield from serve_app({"model": str(tiny_llama_dir), "model_name": "tiny", "api_key_env": KEY_ENV,
                          "max_batch_size": 4, "batch_wait_timeout_s": 0.5, "engine": {"max_model_len": 256}},
                         (KEY_ENV, "sk-test-canary-3f9a"))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=os.environ[KEY_ENV], max_retries=0, timeout=120)


HELLO = [{"role": "user", "content": "Say hello."}]


def test_models_and_a_chat_completion(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12


def test_streamed_completion_matches_the_whole_one(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # tokens left as they were decoded, not one block at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def ask_together(client, n: int = 4) -> list[tuple[int, str]]:
    """``n`` requests at once: each one's batch size (the ``x-cai-batch-size`` header) and answer."""
    def ask(i):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=8, temperature=0)
        return int(raw.headers["x-cai-batch-size"]), raw.parse().choices[0].message.content

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(ask, range(n)))


def test_four_concurrent_requests_are_one_batch(client):
    results = ask_together(client)
    assert [size for size, _ in results] == [4, 4, 4, 4]
    assert all(isinstance(text, str) for _, text in results)


def test_wrong_key_is_401(server):
    bad = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_serve_listens_on_loopback_only_and_no_log_holds_the_key(server, client):
    import psutil
    import ray

    port = int(server.rsplit(":", 1)[1].split("/")[0])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening == ["127.0.0.1"]
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)  # a request with the key
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    key = os.environ[KEY_ENV].encode()
    assert [p for p in logs.rglob("*") if p.is_file() and key in p.read_bytes()] == []


@pytest.mark.parametrize("kwargs,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ({"messages": HELLO, "max_tokens": 4, "stream": True, "stream_options": "x"}, "stream_options"),
    ({"messages": HELLO, "max_tokens": 4, "seed": 2**64}, "seed"),
    ({"messages": HELLO, "max_tokens": 4, "stop": "x" * 100_000}, "stop"),
    ({"messages": HELLO, "max_tokens": 4, "n": 2}, "n"),
], ids=["no-messages", "unknown-role", "max-tokens-0", "prompt-too-long", "stream-options-a-string", "seed-2**64",
        "stop-100k-chars", "n-2"])
def test_bad_requests_are_400_and_the_server_keeps_serving(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    ok = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_cai_serve_command_serves_and_stops_on_ctrl_c(tiny_llama_dir, tmp_path):
    port = free_ports(1)[0]
    env = dict(os.environ, CAI_CLI_KEY="sk-cli-canary-77")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "serve", str(tiny_llama_dir), "--port", str(port),
                             "--api-key-env", "CAI_CLI_KEY", "--max-model-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=ctrl_c_reaches)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving " in line:
                break
        assert any("serving 'tiny_llama'" in x or "serving " in x for x in lines), "".join(lines)[-3000:]
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli-canary-77", max_retries=0)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=HELLO, max_tokens=4)
        assert r.choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        try:
            rest, _ = proc.communicate(timeout=180)  # generous: CI machines may be busy
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    print(f"cai serve stopped {time.monotonic() - stopping:.1f} s after Ctrl-C")
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    # our process prints no traceback; lines of Ray's own workers ("(Name pid=N)") are Ray's logs
    own = [x for x in out.splitlines() if "pid=" not in x.split(")")[0] and "(raylet)" not in x]
    assert "stopping the server" in out and not [x for x in own if "Traceback" in x], out[-3000:]
    assert "sk-cli-canary-77" not in out


def test_serve_run_with_the_shipped_config_file(tiny_llama_dir, tmp_path):
    """`serve run cluster/serve/serve_config.yaml`, with the model and port swapped for the test's."""
    import yaml

    from cluster.connect import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "cluster" / "serve" / "serve_config.yaml").read_text())
    port = free_ports(1)[0]
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(model=str(tiny_llama_dir), engine={"max_model_len": 256})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_reaches)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for _ in range(180):
            try:
                models = c.models.list().data
                break
            except openai.APIConnectionError:
                time.sleep(1)
            except openai.APIStatusError:  # proxy up, application still deploying
                time.sleep(1)
        else:
            raise AssertionError("serve run never answered")
        r = c.chat.completions.create(model=models[0].id, messages=HELLO, max_tokens=4)
        assert models[0].id == tiny_llama_dir.name and r.choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_which_server_serves():
    """`server: auto` is Ray's LLMServer for a vllm backend (the measured pick) and our app otherwise;
    ray-llm without vLLM is refused, naming the fix."""
    from cluster.serve.config import ServeConfig
    from workflows.core.errors import ConfigError

    def cfg(**kw):
        return ServeConfig.from_args(kw)

    assert cfg(engine={"backend": "vllm"}).ray_llm and not cfg(engine={"backend": "vllm"}, server="cai").ray_llm
    assert not cfg(engine={"backend": "transformers"}).ray_llm and not cfg().ray_llm
    with pytest.raises(ConfigError, match="server.*engine.backend: vllm"):
        cfg(server="ray-llm", engine={"backend": "transformers"})
