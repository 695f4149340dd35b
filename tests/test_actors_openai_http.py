"""How the OpenAI-compatible backend uses the network: pooled kept-alive connections, no redirects
followed (the key never reaches another host), plain http:// only to loopback unless allowed, and
the environment's proxy. Local servers on 127.0.0.1 only; nothing here needs the internet."""
from __future__ import annotations

import base64
import socket
import threading
import urllib.parse
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import pytest

from actors import make_engine
from actors.base import EngineError, SamplingParams
from actors.config import EngineConfig, OpenAIOptions
from actors.openai_engine import OpenAIEngine, environment_proxy
from test_actors_openai_engine import KEY_ENV, SECRET, FakeOpenAI, Gate, QuietServer, _user
from workflows.core.errors import ConfigError
from workflows.core.typed import from_dict

PROXY_VARS = ["http_proxy", "https_proxy", "no_proxy", "all_proxy"]


class Recording(FakeOpenAI):
    """FakeOpenAI that also notes each request's TCP peer (one per client connection) and target."""

    def do_POST(self):
        with self.server.state["lock"]:
            self.server.state["peers"].append(self.client_address)
            self.server.state["targets"].append(self.path)
        if self.path.startswith("http://"):  # a proxy is sent the absolute URL
            self.path = urllib.parse.urlsplit(self.path).path
        super().do_POST()


class Redirector(BaseHTTPRequestHandler):
    """Answers every POST with ``server.status`` and ``Location: server.location``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.state["auth"].append(self.headers.get("Authorization"))
        self.send_response(self.server.status)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Sink(FakeOpenAI):
    """A would-be redirect target: records any request, whatever its method, and answers it."""

    def _record(self):
        with self.server.state["lock"]:
            self.server.state["seen"].append((self.command, self.path, self.headers.get("Authorization")))

    def do_POST(self):
        self._record()
        super().do_POST()

    def do_GET(self):
        self._record()
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "followed"}}]})


def _serve(handler, **attrs):
    srv = QuietServer(("127.0.0.1", 0), handler)
    srv.state = {"lock": threading.Lock(), "bodies": [], "auth": [], "attempts": Counter(), "in_flight": 0,
                 "max_in_flight": 0, "peers": [], "targets": [], "seen": []}
    for k, v in attrs.items():
        setattr(srv, k, v)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv


@pytest.fixture
def servers():
    started = []

    def start(handler=Recording, **attrs):
        started.append(_serve(handler, **attrs))
        return started[-1]

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def _engine(base_url: str, **opts) -> OpenAIEngine:
    o = replace(OpenAIOptions(base_url=base_url, api_key_env=KEY_ENV, backoff_s=0.001), **opts)
    return OpenAIEngine(EngineConfig(backend="openai", model="fake-judge", openai=o))


def _url(srv, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{srv.server_address[1]}/v1"


# ---------------------------------------------------------------- pooled connections
def test_many_requests_reuse_max_concurrency_connections(servers, no_proxy_env):
    srv = servers()
    gate = srv.state["gate"] = Gate(3)  # the first call holds 3 requests at once: 3 connections are needed
    eng = gate.watch(_engine(_url(srv), max_concurrency=3))
    gens = eng.generate([_user(f"SLOW {i}") for i in range(9)], SamplingParams(max_new_tokens=8))
    for k in range(3):  # later calls, and a retried row, use the same connections
        gens += eng.generate([_user(f"row {k}.{i}") for i in range(10)] + [_user(f"FLAKY500 {k}")],
                             SamplingParams(max_new_tokens=8))
    assert [g.error for g in gens] == [None] * 42 and srv.state["max_in_flight"] == 3, gate
    peers = Counter(srv.state["peers"])
    assert sum(peers.values()) == eng.requests == 45 and eng.retries == 3
    assert len(peers) == 3, peers  # one new connection per request would be 45
    eng.close()


# ---------------------------------------------------------------- redirects
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed(servers, no_proxy_env, status):
    no_proxy_env.setenv(KEY_ENV, SECRET)
    other = servers(Sink)  # "localhost" is another host than "127.0.0.1" to an HTTP client, and another port
    target = f"{_url(other, 'localhost')}/chat/completions"
    redirector = servers(Redirector, status=status, location=f"{target}?sig=q-secret")
    eng = _engine(_url(redirector), max_retries=3)
    gens = eng.generate([_user("hi"), _user("there")], SamplingParams())
    assert [g.error for g in gens] == [f"http_{status}: redirect to {target} not followed — "
                                       "set engine.openai.base_url to the final URL"] * 2
    assert redirector.state["auth"] == [f"Bearer {SECRET}"] * 2  # base_url's host does get the key
    assert other.state["seen"] == []  # the other host got nothing at all: no request, no key, no prompt
    assert eng.requests == 2 and eng.retries == 0


def test_a_redirect_on_the_same_host_is_not_followed_either(servers, no_proxy_env):
    redirector = servers(Redirector, status=307, location="/v1/chat/completions/")
    gens = _engine(_url(redirector)).generate([_user("hi")], SamplingParams())
    assert gens[0].error.startswith(f"http_307: redirect to {_url(redirector)}/chat/completions/ not followed")
    assert len(redirector.state["auth"]) == 1  # asked once, not again at the new path


# ---------------------------------------------------------------- plain http
LOOPBACK = ["http://127.0.0.1:8000/v1", "http://127.4.5.6/v1", "http://localhost:8000/v1", "http://LOCALHOST./v1",
            "http://[::1]:8000/v1", "http://[::ffff:127.0.0.1]/v1"]
ELSEWHERE = ["http://10.255.255.1/v1", "http://judge.example.com/v1", "http://0.0.0.0:8000/v1",
             "http://127.0.0.1.example.com/v1", "http://localhost.example.com/v1", "http://[::2]/v1",
             "http://192.168.1.10:8000/v1"]
FIX = "use https://, or set allow_insecure_http: true"


@pytest.fixture
def connects(monkeypatch):
    """Every socket connect attempted in the test (none is allowed to happen)."""
    seen = []

    def connect(sock, address):
        seen.append(address)
        raise OSError("the test allows no connection")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return seen


@pytest.mark.parametrize("url", ELSEWHERE)
def test_plain_http_elsewhere_is_refused_at_creation(url, connects, no_proxy_env):
    with pytest.raises(EngineError) as e:
        _engine(url)
    msg = str(e.value)
    assert msg.startswith(f"engine.openai.base_url: got {url!r}") and msg.endswith(FIX) and "\n" not in msg
    with pytest.raises(EngineError, match="allow_insecure_http: true"):
        make_engine(EngineConfig(backend="openai", model="m", openai=OpenAIOptions(base_url=url)))
    with pytest.raises(ConfigError) as c:  # and a recipe says so before anything starts
        from_dict(EngineConfig, {"backend": "openai", "openai": {"base_url": url}}, "stages[1].engine")
    assert str(c.value).startswith("stages[1].engine.openai.base_url: got") and str(c.value).endswith(FIX)

    eng = _engine(url, allow_insecure_http=True)  # the user's explicit choice: accepted
    assert eng.url == url + "/chat/completions"
    cfg = from_dict(EngineConfig, {"backend": "openai", "openai": {"base_url": url, "allow_insecure_http": True}})
    assert cfg.openai.allow_insecure_http is True
    assert connects == []  # creating (or refusing) an engine sends nothing


def test_the_connect_guard_sees_the_engine_connect(connects, no_proxy_env):
    """The guard above is not vacuous: a request (not a creation) does try to connect."""
    eng = _engine("http://10.255.255.1/v1", allow_insecure_http=True, max_retries=0)
    assert connects == []
    gens = eng.generate([_user("x")], SamplingParams())
    assert connects == [("10.255.255.1", 80)] and gens[0].error.startswith("connection_error:")


@pytest.mark.parametrize("url", LOOPBACK + ["https://judge.example.com/v1", "https://10.255.255.1:8443/v1"])
def test_loopback_http_and_any_https_are_accepted(url, connects, no_proxy_env):
    assert _engine(url).url == url + "/chat/completions"
    assert from_dict(EngineConfig, {"backend": "openai", "openai": {"base_url": url}}).openai.base_url == url
    assert connects == []


def test_allow_insecure_http_must_be_a_boolean():
    with pytest.raises(ConfigError, match="allow_insecure_http.*true or false"):
        from_dict(EngineConfig, {"openai": {"base_url": "http://10.0.0.1/v1", "allow_insecure_http": "yes"}}, "e")
    with pytest.raises(ConfigError, match="base_url"):
        from_dict(EngineConfig, {"openai": {"base_url": "http://:8000/v1"}}, "e")  # no host


# ---------------------------------------------------------------- proxies
def test_the_environment_proxy_is_used_except_for_loopback(servers, no_proxy_env):
    no_proxy_env.setenv(KEY_ENV, SECRET)
    proxy = servers()
    no_proxy_env.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.server_address[1]}")
    eng = _engine("http://judge.invalid/v1", allow_insecure_http=True)
    gens = eng.generate([_user("via proxy")], SamplingParams())
    assert gens[0].text == "ECHO: VIA PROXY"
    assert proxy.state["targets"] == ["http://judge.invalid/v1/chat/completions"]

    direct = servers()  # loopback: straight there, never through the proxy
    assert _engine(_url(direct)).generate([_user("direct")], SamplingParams())[0].text == "ECHO: DIRECT"
    assert direct.state["targets"] == ["/v1/chat/completions"] and len(proxy.state["targets"]) == 1


def test_environment_proxy_follows_no_proxy(no_proxy_env):
    no_proxy_env.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.internal:3128")
    assert environment_proxy("https://api.example.com/v1/chat/completions") == "http://user:p%40ss@proxy.internal:3128"
    assert environment_proxy("http://api.example.com/v1/chat/completions") is None  # no HTTP_PROXY
    assert environment_proxy("https://127.0.0.1:8443/v1/chat/completions") is None
    no_proxy_env.setenv("NO_PROXY", "example.com")
    assert environment_proxy("https://api.example.com/v1/chat/completions") is None
    assert environment_proxy("https://api.other.org/v1/chat/completions") is not None
    eng = _engine("https://api.other.org/v1")  # through the proxy, with its credentials as a proxy header
    assert eng._http.proxy.host == "proxy.internal" and eng._http.proxy.port == 3128
    assert eng._http.proxy_headers["proxy-authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
