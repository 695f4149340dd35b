"""The OpenAI chat-completions protocol, as pure functions: request validation into our
conversation + sampling parameters, responses, streamed chunks, and OpenAI-style errors.
No Ray, no model: unit-tested in milliseconds."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from actors.base import SamplingParams

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 256
# What one request may cost before anything is tokenized (``cai serve`` can change the first three):
DEFAULT_MAX_BODY_BYTES = 1 << 20  # the JSON body, counted as it arrives (Content-Length or chunked)
DEFAULT_MAX_MESSAGES = 256
PROMPT_CHARS_PER_TOKEN = 32  # default max_prompt_chars: this many characters per token of max_model_len
MAX_STOP = 4
MAX_STOP_CHARS = 256
SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's int64; torch.manual_seed takes all of it, vLLM hashes it
SHOWN_CHARS = 60  # how much of a rejected value an error message repeats


class RequestError(Exception):
    """An OpenAI-style error: HTTP ``status``, ``message``, ``param`` and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Per-request bounds checked before tokenizing. ``max_prompt_chars`` None: ``PROMPT_CHARS_PER_TOKEN``
    characters per token of the model length (far above any prompt that fits it)."""

    max_messages: int = DEFAULT_MAX_MESSAGES
    max_prompt_chars: int | None = None

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else PROMPT_CHARS_PER_TOKEN * max_model_len


@dataclass(frozen=True)
class ChatRequest:
    conversation: tuple  # ({"role", "content"}, ...)
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut short: an error message never repeats a megabyte of the request."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_content_type(value: str | None) -> None:
    """The body must be declared JSON (``application/json``, parameters such as charset allowed)."""
    if (value or "").split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {shown(value)}", "Content-Type",
                           "unsupported_media_type", status=415)


def too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than this server's limit of {limit} bytes", None,
                        "request_too_large", status=413)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes):
    """The body as JSON (standard JSON only: no NaN or Infinity), or a 400."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("the request body nests too deeply", None, "invalid_json") from None
    except ValueError:  # also bad UTF-8 and integers of thousands of digits
        raise RequestError("the request body is not valid JSON", None, "invalid_json") from None


def _text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no tokenizer takes it
        raise RequestError(f"{param} is not valid Unicode text (a lone surrogate)", param, "invalid_value") from None
    return value


def _content(msg: dict, i: int) -> str:
    param = f"messages[{i}].content"
    content = msg.get("content")
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"type {shown(kind)}" if isinstance(part, dict) else shown(part)
                raise RequestError(f"{param}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                   f"supported, got {what}", param, "unsupported_content")
            texts.append(_text(part["text"], param))
        return "".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts, got {shown(content)}", param)


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind} in [{lo}, {hi}], got {shown(value)}", key, "invalid_value")
    return value


def _flag(body: dict, key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{param or key} must be true or false, got {shown(value)}", param or key, "invalid_value")
    return bool(value)


def _messages(body: dict, limits: Limits, max_model_len: int) -> tuple:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"messages holds {len(messages)} messages, more than this server's limit of "
                           f"{limits.max_messages}", "messages", "too_many_messages")
    conversation, chars = [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = msg.get("role")
        role = "system" if role == "developer" else role
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"messages[{i}].role: unknown role {shown(msg.get('role'))}; use system, user or "
                               "assistant", f"messages[{i}].role", "invalid_role")
        content = _content(msg, i)
        chars += len(content)
        conversation.append({"role": role, "content": content})
    if chars > limits.prompt_chars(max_model_len):
        raise RequestError(f"the messages hold {chars} characters, more than this server's limit of "
                           f"{limits.prompt_chars(max_model_len)} (its model takes {max_model_len} tokens) — "
                           "shorten the messages", "messages", "context_length_exceeded")
    if conversation[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: nothing to answer", "messages")
    return tuple(conversation)


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP} strings, got {shown(stop)}",
                           "stop", "invalid_value")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}] must be a string of at most {MAX_STOP_CHARS} characters, got "
                               f"{shown(s)}", "stop", "invalid_value")
    return tuple(stop)


def _max_tokens(body: dict, max_model_len: int) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is None:  # the default; a prompt it does not leave room for is a context-length 400
        return DEFAULT_MAX_TOKENS
    return _number(body, key, 1, max_model_len, None, integer=True)


def parse_chat(body, model_name: str, max_model_len: int, limits: Limits = Limits()) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises ``RequestError`` (400/404) naming the field.
    Every field we read is type- and range-checked (a bool is not a number); fields we do not read
    (tools, user, ...) are ignored, as OpenAI-compatible servers do."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {shown(model)}", "model", "invalid_value")
    if model not in (None, "", model_name):
        raise RequestError(f"the model {shown(model)} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found", status=404)
    conversation = _messages(body, limits, max_model_len)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise RequestError(f"only n=1 is supported, got {shown(n)}", "n", "invalid_value")
    max_tokens = _max_tokens(body, max_model_len)
    stop = _stop(body)
    seed = _number(body, "seed", *SEED_RANGE, None, integer=True)
    temperature = float(_number(body, "temperature", 0, 2, 1.0))
    top_p = float(_number(body, "top_p", 0, 1, 1.0))
    if top_p == 0:
        raise RequestError("top_p must be greater than 0", "top_p", "invalid_value")
    repetition_penalty = float(_number(body, "repetition_penalty", 0.5, 2, 1.0))
    for key in ("frequency_penalty", "presence_penalty"):  # accepted, not applied (OpenAI's range)
        _number(body, key, -2, 2, 0.0)
    if _flag(body, "logprobs"):
        raise RequestError("logprobs are not supported by this server", "logprobs", "unsupported_value")
    if _number(body, "top_logprobs", 0, 20, 0, integer=True):
        raise RequestError("top_logprobs: logprobs are not supported by this server", "top_logprobs",
                           "unsupported_value")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {shown(options)}", "stream_options",
                           "invalid_value")
    usage = _flag(options or {}, "include_usage", "stream_options.include_usage") and stream
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                            repetition_penalty=repetition_penalty)
    return ChatRequest(conversation, params, stream, usage)


def check_length(prompt_tokens: int, req: ChatRequest, max_model_len: int) -> None:
    if prompt_tokens + req.params.max_new_tokens > max_model_len:
        raise RequestError(f"this model's maximum context length is {max_model_len} tokens; the messages take "
                           f"{prompt_tokens} and max_tokens asks for {req.params.max_new_tokens} more — shorten the "
                           "messages or lower max_tokens", "messages", "context_length_exceeded")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion(cid: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, reason: str | None = None, usage_: dict | None = None) -> dict:
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": None if reason is None else finish_reason(reason)}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(obj) -> str:
    """One server-sent event; ``[DONE]`` ends the stream."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "cai-ray"}]}


class TextDeltas:
    """Turns a growing token list into text deltas whose concatenation is the final answer: leading
    whitespace and a possible stop string's beginning are held back until they are settled."""

    def __init__(self, decode, stop_ids, stop: tuple = ()):
        self.decode, self.stop_ids, self.stop = decode, set(stop_ids), stop
        self.tokens: list[int] = []
        self.sent, self.done = "", False

    def push(self, tokens: list[int]) -> str:
        if self.done:
            return ""
        for t in tokens:
            if t in self.stop_ids:
                self.done = True
                break
            self.tokens.append(t)
        text = self.decode(self.tokens).lstrip()
        hold = max((len(s) - 1 for s in self.stop if s), default=0)
        for s in self.stop:
            if s and s in text:
                text, self.done = text[:text.index(s)], True
        safe = text if self.done else text[:len(text) - hold] if hold else text
        safe = safe.rstrip()  # trailing whitespace waits: the final answer is stripped
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            safe = safe.rstrip("\ufffd")
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final answer (authoritative: cut at stops, stripped)."""
        self.done = True
        if final_text.startswith(self.sent):
            delta, self.sent = final_text[len(self.sent):], final_text
            return delta
        return ""


# ---------------------------------------------------------------- an OpenAI-style server upstream
def upstream_body(req: ChatRequest, model: str) -> dict:
    """The validated request as a body for an OpenAI-style server upstream (vLLM's, behind Ray's
    ``LLMServer``): streamed with usage when the client streams, else one answer (a stream of one
    message per token costs a non-streaming client a fifth of the throughput at concurrency 16)."""
    p = req.params
    body = {"model": model, "messages": [dict(m) for m in req.conversation], "max_tokens": p.max_new_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "repetition_penalty": p.repetition_penalty,
            "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    return body


def stream_events(item) -> list[dict]:
    """The JSON objects in one item an upstream server streamed: an SSE string (``data: {...}``, one or
    several), a list of such items (Ray's ``LLMServer`` batches its chunks), a dict or a pydantic
    object (an error response); ``[DONE]`` is left out."""
    if isinstance(item, list):
        return [e for part in item for e in stream_events(part)]
    if isinstance(item, dict):
        return [item]
    if hasattr(item, "model_dump"):
        return [item.model_dump()]
    out = []
    for line in str(item).splitlines():
        line = line.strip()
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


@dataclass
class Upstream:
    """What one upstream event says: a piece of the answer, the finish reason, the token counts, or an error."""

    content: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None

    @classmethod
    def of(cls, event: dict) -> "Upstream":
        if "error" in event:
            return cls(error=event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])})
        choice = (event.get("choices") or [{}])[0]
        said = choice.get("delta") or choice.get("message") or {}  # a stream's chunk, or a whole answer
        return cls(content=said.get("content") or "", finish_reason=choice.get("finish_reason"),
                   usage=event.get("usage"))


def upstream_error(error: dict) -> RequestError | None:
    """An upstream 4xx as ours (the client can fix it: the same status, its message); None for a fault (5xx)."""
    try:
        status = int(error.get("code") or 500)
    except (TypeError, ValueError):
        status = 500
    if not 400 <= status < 500:
        return None
    message = str(error.get("message") or "the request was refused")
    if "context length" in message:
        return RequestError(message, "messages", "context_length_exceeded", status)
    return RequestError(message, error.get("param"), None, status)
