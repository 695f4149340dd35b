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


class RequestError(Exception):
    """An OpenAI-style error: HTTP ``status``, ``message``, ``param`` and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    conversation: tuple  # ({"role", "content"}, ...)
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


def _content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
        raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                           "unsupported_content")
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind} in [{lo}, {hi}], got {value!r}", key, "invalid_value")
    return value


def parse_chat(body, model_name: str, max_model_len: int) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises ``RequestError`` (400/404) naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model not in (None, "", model_name):
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found", status=404)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    conversation = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = "system" if msg.get("role") == "developer" else msg.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role: unknown role {msg.get('role')!r}; use system, user or assistant",
                               f"messages[{i}].role", "invalid_role")
        conversation.append({"role": role, "content": _content(msg, i)})
    if conversation[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: nothing to answer", "messages")
    if body.get("n", 1) not in (1, None):
        raise RequestError("only n=1 is supported", "n", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, 1, max_model_len, DEFAULT_MAX_TOKENS, integer=True)
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of at most 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=float(_number(body, "temperature", 0, 2, 1.0)),
                            top_p=float(_number(body, "top_p", 0, 1, 1.0)), seed=seed, stop=tuple(stop),
                            repetition_penalty=float(_number(body, "repetition_penalty", 0.5, 2, 1.0)))
    if params.top_p == 0:
        raise RequestError("top_p must be greater than 0", "top_p", "invalid_value")
    usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    return ChatRequest(tuple(conversation), params, stream, usage)


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
