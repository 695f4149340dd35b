"""The OpenAI-compatible HTTP backend of the engine protocol.

Talks to ``POST {cfg.openai.base_url}/chat/completions`` of any OpenAI-compatible server
(a hosted judge, ``vllm serve``, our own Ray Serve app) through one ``urllib3`` connection pool
per engine, kept across calls, plus a thread pool of ``cfg.openai.max_concurrency`` workers:
one request per row, results in input order, at most ``max_concurrency`` requests and open
connections at a time (kept alive and reused, not one new connection per request).

- **API key**: read at request time from the environment variable *named* by
  ``cfg.openai.api_key_env`` and sent as ``Authorization: Bearer ...``; it is never stored
  on the engine, logged, or accepted from config.
- **Where it goes**: only to ``base_url``'s own scheme, host and port. Redirects are not
  followed (a 3xx fails its row as ``http_3xx``), so neither the key nor the prompt is ever
  sent to another host. Plain ``http://`` is refused at creation unless the host is loopback
  (127.0.0.0/8, ::1, ``localhost``) or ``allow_insecure_http: true``. A proxy named by the
  environment (``HTTPS_PROXY``/``HTTP_PROXY``, minus ``NO_PROXY``, as urllib reads them) is
  used, except for loopback hosts, which a proxy cannot reach.
- **Retries**: connection errors, timeouts, HTTP 429 and 5xx are retried up to
  ``max_retries`` times, waiting ``backoff_s * 2**attempt`` plus up to 25 % jitter, or the
  server's ``Retry-After`` when it sends one; every wait is capped at 30 s. Any other 4xx
  (and any 3xx) fails its row at once. ``timeout_s`` bounds the connect and each wait for
  data. A row that still fails becomes ``Generation.failed("<code>: <detail>")``
  (codes: ``http_<status>``, ``timeout``, ``connection_error``, ``bad_response``,
  ``bad_conversation``) — never an exception for the batch.
- **Seeds**: with ``params.seed`` set, each row is sent its own seed derived from
  ``(seed, conversation, how many identical conversations came before it in the batch)``,
  so duplicated prompts (K samples per prompt) still get different samples, and a row's
  seed does not depend on the other rows of its batch.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import urllib3

from actors.base import EngineError, Generation, SamplingParams
from actors.config import ENV_NAME, EngineConfig, OpenAIOptions

log = logging.getLogger(__name__)

MAX_WAIT_S = 30.0  # cap on any single retry wait, Retry-After included
VERY_UNLIKELY = -9999.0  # OpenAI reports tokens outside its top 20 with this logprob


# ---------------------------------------------------------------- pure helpers
def conversation_key(conversation) -> str:
    """A stable text key of a conversation (used to derive per-row seeds)."""
    return json.dumps(conversation, sort_keys=True, ensure_ascii=False, default=str)


def row_seeds(seed: int | None, keys: list[str]) -> list[int | None]:
    """One seed per row from ``(seed, key, occurrence of that key so far)``; ``None`` stays ``None``."""
    if seed is None:
        return [None] * len(keys)
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        k = seen[key] = seen.get(key, -1) + 1
        digest = hashlib.sha256(f"{seed}\x00{k}\x00{key}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)
    return out


def retry_delay(attempt: int, backoff_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``Retry-After`` (delta-seconds or an
    HTTP date) when given, else ``backoff_s * 2**attempt`` plus up to 25 % jitter; ≤ 30 s."""
    if retry_after:
        try:
            return min(MAX_WAIT_S, max(0.0, float(retry_after)))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                return min(MAX_WAIT_S, max(0.0, when - time.time()))
            except (TypeError, ValueError, OverflowError):
                pass  # unparseable header: fall back to our own backoff
    base = backoff_s * 2 ** attempt
    return min(MAX_WAIT_S, base + random.uniform(0.0, 0.25 * base))


def choice_matches(token: str, choice: str) -> bool:
    """The matching rule of ``choice_logprobs``: a returned token stands for ``choice`` when,
    whitespace-stripped, it equals the choice, ``"(" + choice``, ``choice + ")"`` or
    ``"(" + choice + ")"`` (case-sensitive: "a" is not "A"). So " A", "A", "(A" and "A)" all
    count as answer A."""
    c, t = choice.strip(), token.strip()
    return bool(c) and t in (c, f"({c}", f"{c})", f"({c})")


def match_choices(candidates: list[tuple[str, float]], choices: list[str]) -> list[float]:
    """Per choice, the max logprob over the ``(token, logprob)`` candidates matching it
    (:func:`choice_matches`); ``-inf`` for a choice none matches. If *no* choice matches
    any candidate the row is unknowable from the top-k: all NaN (callers treat NaN as a row
    error). Logprobs at OpenAI's "very unlikely" sentinel (-9999) count as absent."""
    out = []
    for c in choices:
        found = [float(lp) for tok, lp in candidates
                 if lp is not None and float(lp) > VERY_UNLIKELY and choice_matches(str(tok), c)]
        out.append(max(found) if found else -math.inf)
    return out if any(v > -math.inf for v in out) else [math.nan] * len(choices)


def _short(raw: bytes | str, limit: int = 200) -> str:
    """A one-line error detail: the JSON ``error.message`` when there is one, else the text."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        err = json.loads(text).get("error")
        text = err.get("message", text) if isinstance(err, dict) else (err or text)
    except (ValueError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return text[:limit] + ("…" if len(text) > limit else "")


def _where(url: str) -> str:
    """``scheme://host:port/path`` of a URL, without user info, query or fragment (for messages)."""
    try:
        p = urllib.parse.urlsplit(url)
        host = f"[{p.hostname}]" if p.hostname and ":" in p.hostname else p.hostname
        return _short(f"{p.scheme}://{host}{f':{p.port}' if p.port else ''}{p.path}", 120)
    except ValueError:
        return "an unparseable URL"


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY`` / ``HTTP_PROXY`` minus
    ``NO_PROXY``, read as urllib reads them), or None. Loopback hosts never use one."""
    p = urllib.parse.urlsplit(url)
    if OpenAIOptions.is_loopback(p.hostname):
        return None
    proxy = urllib.request.getproxies().get(p.scheme)
    if not proxy or urllib.request.proxy_bypass(p.netloc.rpartition("@")[2]):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def connection_pool(url: str, size: int, timeout_s: float) -> urllib3.PoolManager:
    """A pool of at most ``size`` kept-alive connections for ``url``'s host (through the
    environment's proxy, if any). It never retries or follows redirects by itself."""
    kw = {"num_pools": 1, "maxsize": size, "block": True, "retries": False,
          "timeout": urllib3.Timeout(connect=timeout_s, read=timeout_s)}
    proxy = environment_proxy(url)
    if proxy is None:
        return urllib3.PoolManager(**kw)
    auth = urllib.parse.unquote(urllib3.util.parse_url(proxy).auth or "")
    headers = urllib3.make_headers(proxy_basic_auth=auth) if auth else None
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **kw)


class _RowFailed(Exception):
    """One row failed for good; ``str(exc)`` is ``"<code>: <detail>"``."""


# ---------------------------------------------------------------- the engine
class OpenAIEngine:
    """``Engine`` over an OpenAI-compatible ``/chat/completions`` endpoint; ``name`` is
    ``openai:<model>``. ``requests`` and ``retries`` count HTTP attempts and retries."""

    def __init__(self, cfg: EngineConfig):
        o = cfg.openai
        if not ENV_NAME.fullmatch(str(o.api_key_env or "")):
            # Never echo the value: it may be a key pasted into the wrong field.
            raise EngineError("engine.openai.api_key_env: must be the NAME of an environment variable "
                              "(letters, digits, _), e.g. OPENAI_API_KEY — never the key itself")
        for name, failed, fix in o.problems():
            if failed:
                raise EngineError(f"engine.openai.{name}: got {getattr(o, name)!r} — {fix}")
        self.cfg, self.opts = cfg, o
        self.url = str(o.base_url).rstrip("/") + "/chat/completions"
        self.name = f"openai:{cfg.model}"
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()
        self._http = connection_pool(self.url, o.max_concurrency, o.timeout_s)

    def close(self) -> None:
        """Close the pooled connections (a later request opens new ones)."""
        self._http.clear()

    def __repr__(self) -> str:
        return f"OpenAIEngine(name={self.name!r}, url={self.url!r}, key_from=${self.opts.api_key_env})"

    # ------------------------------------------------------------ HTTP
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.opts.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _count(self, attr: str) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)

    def _post(self, payload: dict) -> dict:
        """POST with retries; the parsed JSON body, or :class:`_RowFailed`."""
        try:
            body = json.dumps(payload).encode()
        except (TypeError, ValueError) as e:
            raise _RowFailed(f"bad_conversation: not JSON-serializable: {e}") from None
        last = ""
        for attempt in range(self.opts.max_retries + 1):
            retry_after = None
            self._count("requests")
            try:
                resp = self._http.urlopen("POST", self.url, body=body, headers=self._headers(), redirect=False,
                                          retries=False, preload_content=True, pool_timeout=self.opts.timeout_s)
            except urllib3.exceptions.NewConnectionError as e:  # refused, unresolvable (a ConnectTimeoutError too)
                last = f"connection_error: {type(e).__name__}: {e}"
            except urllib3.exceptions.TimeoutError as e:  # connect or read timeout
                last = f"timeout: {type(e).__name__}: {e}"
            except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as e:  # resets, TLS, proxy
                last = f"connection_error: {type(e).__name__}: {e}"
            else:
                if 200 <= resp.status < 300:
                    try:
                        return json.loads(resp.data)
                    except ValueError:
                        raise _RowFailed(f"bad_response: not JSON: {_short(resp.data)}") from None
                if 300 <= resp.status < 400:  # never followed: the key and the prompt stay with base_url's host
                    to = resp.headers.get("Location")
                    to = _where(urllib.parse.urljoin(self.url, to)) if to else "nowhere (no Location)"
                    raise _RowFailed(f"http_{resp.status}: redirect to {to} not followed — "
                                     "set engine.openai.base_url to the final URL")
                last = f"http_{resp.status}: {_short(resp.data)}"
                if resp.status != 429 and resp.status < 500:
                    raise _RowFailed(last)
                retry_after = resp.headers.get("Retry-After")
            if attempt < self.opts.max_retries:
                self._count("retries")
                time.sleep(retry_delay(attempt, self.opts.backoff_s, retry_after))
        raise _RowFailed(f"{last} (gave up after {self.opts.max_retries + 1} attempts)")

    def _map(self, fn, rows: list) -> list:
        """``fn`` over ``rows`` on at most ``max_concurrency`` threads, results in input order."""
        if not rows:
            return []
        with ThreadPoolExecutor(max_workers=min(self.opts.max_concurrency, len(rows))) as pool:
            return list(pool.map(fn, rows))

    # ------------------------------------------------------------ generate
    def generate(self, conversations, params: SamplingParams) -> list[Generation]:
        """One assistant reply per conversation, in input order (see the module docstring)."""
        if params.max_new_tokens < 1:
            raise EngineError(f"sampling.max_new_tokens must be ≥ 1, got {params.max_new_tokens}")
        seeds = row_seeds(params.seed, [conversation_key(c) for c in conversations])
        return self._map(lambda row: self._generate_one(row[0], params, row[1]), list(zip(conversations, seeds)))

    def _generate_one(self, conversation, params: SamplingParams, seed: int | None) -> Generation:
        payload = {"model": self.cfg.model, "messages": conversation, "max_tokens": params.max_new_tokens,
                   "temperature": max(0.0, params.temperature), "top_p": params.top_p}
        if seed is not None:
            payload["seed"] = seed
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:  # an extension vLLM's OpenAI server accepts; others ignore it
            payload["repetition_penalty"] = params.repetition_penalty
        try:
            data = self._post(payload)
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            usage = data.get("usage") or {}
        except _RowFailed as e:
            return Generation.failed(str(e))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            return Generation.failed(f"bad_response: no choices[0].message ({type(e).__name__}: {e})")
        raw_reason = choice.get("finish_reason") or "stop"
        gen = Generation(text=str(text).strip(), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0),
                         finish_reason="length" if raw_reason == "length" else "stop")
        if raw_reason not in ("stop", "length"):
            gen.extra["finish_reason"] = raw_reason  # e.g. content_filter, tool_calls
        return gen

    # ------------------------------------------------------------ choices
    def choice_logprobs(self, conversations, choices: list[str]) -> list[list[float]]:
        """log P(each choice) as the assistant's first token, from the server's top-k
        alternatives (``max_tokens=1, temperature=0, logprobs=true, top_logprobs=k``) matched to
        the choices by :func:`choice_matches`. A choice outside the top-k gets ``-inf``; a row
        where no choice is in the top-k, or whose request failed, is all NaN (a row error)."""
        choices = list(choices)
        if not choices or not all(str(c).strip() for c in choices):
            raise EngineError("choice_logprobs: choices must be non-empty strings — pass e.g. ['A', 'B']")
        rows = self._map(lambda conv: self._choice_one(conv, choices), list(conversations))
        failed = [r for r in rows if isinstance(r, str)]
        if failed:
            log.warning("%s: %d/%d choice_logprobs rows failed, e.g. %s", self.name, len(failed), len(rows), failed[0])
        return [[math.nan] * len(choices) if isinstance(r, str) else r for r in rows]

    def _choice_one(self, conversation, choices: list[str]) -> list[float] | str:
        payload = {"model": self.cfg.model, "messages": conversation, "max_tokens": 1, "temperature": 0.0,
                   "logprobs": True, "top_logprobs": self.opts.top_logprobs}
        try:
            first = self._post(payload)["choices"][0]["logprobs"]["content"][0]
            candidates = [(first.get("token", ""), first.get("logprob"))]
            candidates += [(t.get("token", ""), t.get("logprob")) for t in first.get("top_logprobs") or []]
        except _RowFailed as e:
            return str(e)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            return f"bad_response: no choices[0].logprobs.content[0] ({type(e).__name__}: {e})"
        return match_choices(candidates, choices)
