"""What every server of ours does before a model sees a request, shared by the app over our engines
(``cluster.serve.app``) and the gateway in front of Ray's ``LLMServer`` (``cluster.serve.gateway``):
the bearer key, the body read within its byte limit, the request validated into our conversation and
sampling parameters (``protocol``), request ids, and errors in OpenAI's shape — a 4xx naming the field
for bad input, a 500 that quotes the request id (its traceback in the replica's log) for our faults."""
# no `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime
import hashlib
import hmac
import logging
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cluster.serve import protocol as oa

logger = logging.getLogger("ray.serve")  # a replica's log file, next to Serve's own lines for the request
# Serve's proxy puts a request id on every request (the client's own x-request-id, else a new one) and
# echoes it on every response: a server error quotes it, and adds the header only where none came in
REQUEST_ID = "x-request-id"


def error_response(e: oa.RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class RequestId(str):
    """A request's id; ``minted`` when no proxy in front gave one, so no proxy will echo it either."""

    minted = False

    @classmethod
    def of(cls, headers) -> "RequestId":
        given = headers.get(REQUEST_ID)
        rid = cls(given or uuid.uuid4().hex)
        rid.minted = not given
        return rid


def server_error(request_id: RequestId, code: str = "internal_error") -> JSONResponse:
    """A genuine fault of ours: the client gets the request id to quote, never the exception; the
    traceback is in the replica's log under that id."""
    body = oa.RequestError(f"the server failed on this request (request id {request_id}); the error is in "
                           "the server's log", None, code, 500, "server_error").body()
    body["error"]["request_id"] = str(request_id)
    # one x-request-id header, not two: the proxy that set the id adds it to the response itself
    return JSONResponse(body, status_code=500, headers={REQUEST_ID: str(request_id)} if request_id.minted else None)


class ErrorBoundary:
    """ASGI middleware, the app's catch-all: an exception escaping a route is logged with its
    traceback and request id and answered by a 500 that carries the id (once a response has
    started, e.g. a stream, it can only be logged)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception:  # noqa: BLE001 — not CancelledError: a client that went away is not a fault
            rid = RequestId.of({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]})
            logger.exception("request %s: %s %s failed", rid, scope.get("method"), scope.get("path"))
            if not started:
                await server_error(rid)(scope, receive, send)


async def _http_error(request: Request, exc: HTTPException):
    """Unknown routes and methods keep FastAPI's 404 / 405 (and its Allow header), in OpenAI's shape."""
    return JSONResponse(oa.RequestError(str(exc.detail), None, None, exc.status_code).body(),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def new_api() -> FastAPI:
    """A FastAPI app with the catch-all 500 and OpenAI-shaped 404/405 (one per ingress class)."""
    api = FastAPI(title="cai-ray", docs_url=None, redoc_url=None)
    api.add_middleware(ErrorBoundary)
    api.add_exception_handler(HTTPException, _http_error)
    return api


class Guard:
    """The checks of a request, for an ingress class: ``guard_setup`` in its ``__init__`` (which
    sets ``self.created`` too); its routes call ``models_reply`` and ``admit``."""

    def guard_setup(self, model_name: str, max_model_len: int, api_key_sha256: str | None, api_key_env: str | None,
                    max_body_bytes: int, max_messages: int, max_prompt_chars: int | None) -> None:
        if api_key_env and not api_key_sha256:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"api_key_env: the variable {api_key_env} is not set on this replica's node")
            api_key_sha256 = hashlib.sha256(key.encode()).hexdigest()
        self.model_name, self.max_model_len, self.key_hash = model_name, max_model_len, api_key_sha256
        self.max_body_bytes = max_body_bytes
        self.limits = oa.Limits(max_messages=max_messages, max_prompt_chars=max_prompt_chars)

    def authorized(self, request: Request) -> bool:
        if self.key_hash is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_hash)

    @staticmethod
    def unauthorized() -> JSONResponse:
        return error_response(oa.RequestError("Incorrect API key provided: pass the key the server was started "
                                              "with as a bearer token", None, "invalid_api_key", status=401))

    def models_reply(self, request: Request):
        """``GET /v1/models``: the one model served, or a 401."""
        return oa.models_list(self.model_name, self.created) if self.authorized(request) else self.unauthorized()

    async def admit(self, request: Request) -> tuple[RequestId | None, oa.ChatRequest | JSONResponse]:
        """A ``POST /v1/chat/completions``: (its request id, the validated request), or the error
        response to send instead of the request (a 401, or the 4xx naming the field)."""
        if not self.authorized(request):
            return None, self.unauthorized()
        rid = RequestId.of(request.headers)
        try:
            return rid, await self.chat_request(request)
        except oa.RequestError as e:
            return rid, error_response(e)

    async def chat_request(self, request: Request) -> oa.ChatRequest:
        """The request's body, read within ``max_body_bytes`` and validated; raises ``RequestError``."""
        oa.check_content_type(request.headers.get("content-type"))
        body = oa.parse_json(await self._body(request))
        return oa.parse_chat(body, self.model_name, self.max_model_len, self.limits)

    async def _body(self, request: Request) -> bytes:
        """The body, never more than ``max_body_bytes`` of it read: a declared Content-Length over the
        limit is refused before reading, and a chunked body is counted as it arrives."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise oa.too_large(self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise oa.too_large(self.max_body_bytes)
            chunks.append(chunk)
        return b"".join(chunks)
