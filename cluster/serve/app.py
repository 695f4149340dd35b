"""The Ray Serve application: an OpenAI-compatible API (``GET /v1/models``,
``POST /v1/chat/completions`` with and without streaming) over any of our engines.

Concurrent requests are batched (``@serve.batch``): one engine call per batch and sampling setting,
run off the event loop, so the replica keeps answering (models, errors, other requests' streams)
while it generates. On the transformers engine a stream is real: tokens leave as they are decoded.
Each response carries ``x-cai-batch-size``, the number of requests generated together with it.

The bearer key: ``api_key_sha256`` (``cai serve --api-key-env`` hashes the variable in the driver, so
the key itself never reaches Ray) or ``api_key_env`` (the replica reads its own environment).
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime
import asyncio
import hashlib
import hmac
import inspect
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from actors import EngineConfig, make_engine
from actors.base import Generation
from cluster.serve import protocol as oa
from workflows.core.typed import from_dict

api = FastAPI(title="cai-ray", docs_url=None, redoc_url=None)


def _error(e: oa.RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


# Ctrl-C should stop a server within seconds: in-flight requests get 5 s, not Serve's default 20
@serve.deployment(name="ChatModel", max_ongoing_requests=64, graceful_shutdown_timeout_s=5,
                  graceful_shutdown_wait_loop_s=1)
@serve.ingress(api)
class ChatModel:
    def __init__(self, engine: dict, model_name: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.1,
                 api_key_sha256: str | None = None, api_key_env: str | None = None):
        self.cfg = from_dict(EngineConfig, engine, "serve engine")
        self.engine = make_engine(self.cfg)
        self.model_name, self.created = model_name, int(time.time())
        if api_key_env and not api_key_sha256:
            key = os.environ.get(api_key_env)
            if not key:
                raise RuntimeError(f"api_key_env: the variable {api_key_env} is not set on this replica's node")
            api_key_sha256 = hashlib.sha256(key.encode()).hexdigest()
        self.key_hash = api_key_sha256
        self.streams_tokens = "on_tokens" in inspect.signature(self.engine.generate).parameters
        tok = getattr(self.engine, "tokenizer", None)
        self.decode = (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else None
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # ------------------------------------------------------------------ auth
    def _authorized(self, request: Request) -> bool:
        if self.key_hash is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_hash)

    def _unauthorized(self) -> JSONResponse:
        return _error(oa.RequestError("Incorrect API key provided: pass the key the server was started with as "
                                      "a bearer token", None, "invalid_api_key", status=401))

    # ------------------------------------------------------------------ routes
    @api.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        return oa.models_list(self.model_name, self.created)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = await request.json()
        except ValueError:
            return _error(oa.RequestError("the request body is not valid JSON"))
        try:
            req = oa.parse_chat(body, self.model_name, self.cfg.max_model_len)
            prompt_tokens = self._count(req)
        except oa.RequestError as e:
            return _error(e)
        cid = oa.completion_id()
        events = self._generate(req)
        if req.stream:
            return StreamingResponse(self._sse(cid, req, prompt_tokens, events), media_type="text/event-stream")
        final, batch = None, 1
        async for step in events:
            for kind, value, size in step:
                if kind == "done":
                    final, batch = value, size
        if final.error and final.error.startswith("prompt_too_long"):  # engines that cannot count up front
            return _error(oa.RequestError(f"{final.error} — shorten the messages or lower max_tokens", "messages",
                                          "context_length_exceeded"))
        if final.error:
            return _error(oa.RequestError(f"generation failed: {final.error}", None, "generation_failed",
                                          status=500, kind="server_error"))
        body = oa.completion(cid, self.model_name, final.text, final.finish_reason,
                             final.prompt_tokens or prompt_tokens, final.completion_tokens)
        return JSONResponse(body, headers={"x-cai-batch-size": str(batch)})

    def _count(self, req: oa.ChatRequest) -> int:
        count = getattr(self.engine, "count_tokens", None)
        if count is None:
            return 0
        n = count(list(req.conversation))
        oa.check_length(n, req, self.cfg.max_model_len)
        return n

    async def _sse(self, cid: str, req: oa.ChatRequest, prompt_tokens: int, events):
        deltas = (oa.TextDeltas(self.decode, getattr(self.engine, "stop_ids", ()), req.params.stop)
                  if self.decode else None)
        yield oa.sse(oa.chunk(cid, self.model_name, {"role": "assistant", "content": ""}))
        async for step in events:
            for kind, value, _ in step:
                if kind == "tokens" and deltas is not None:
                    text = deltas.push(value)
                    if text:
                        yield oa.sse(oa.chunk(cid, self.model_name, {"content": text}))
                elif kind == "done":
                    g: Generation = value
                    if g.error:
                        err = oa.RequestError(f"generation failed: {g.error}", None, "generation_failed", 500,
                                              "server_error")
                        yield oa.sse(err.body())
                        yield oa.sse("[DONE]")
                        return
                    rest = deltas.finish(g.text) if deltas is not None else g.text
                    if rest:
                        yield oa.sse(oa.chunk(cid, self.model_name, {"content": rest}))
                    yield oa.sse(oa.chunk(cid, self.model_name, {}, g.finish_reason))
                    if req.include_usage:
                        yield oa.sse(oa.chunk(cid, self.model_name, {}, usage_=oa.usage(
                            g.prompt_tokens or prompt_tokens, g.completion_tokens)))
        yield oa.sse("[DONE]")

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)  # both set from the config in __init__
    async def _generate(self, reqs: list[oa.ChatRequest]):
        """One engine call per sampling setting for the whole batch, in a thread. Yields, per request,
        the list of its new events: ``("tokens", ids, n)`` while decoding, then ``("done", Generation, n)``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        n = len(reqs)

        def emit(*event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def run():
            groups: dict = {}
            for i, r in enumerate(reqs):
                groups.setdefault(r.params, []).append(i)
            for params, idx in groups.items():
                extra = ({"on_tokens": lambda row, ids, idx=idx: emit("tokens", idx[row], ids)}
                         if self.streams_tokens and any(reqs[i].stream for i in idx) else {})
                try:
                    gens = self.engine.generate([list(reqs[i].conversation) for i in idx], params, **extra)
                except Exception as e:  # noqa: BLE001 — the batch's requests get a 500, the server goes on
                    gens = [Generation.failed(f"{type(e).__name__}: {e}")] * len(idx)
                for i, g in zip(idx, gens):
                    emit("done", i, g)

        work = loop.run_in_executor(None, run)
        finished: set[int] = set()
        while len(finished) < n:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            step: list = [[] for _ in range(n)]
            for kind, i, value in items:
                step[i].append((kind, value, n))
            out = []
            for i in range(n):
                if i in finished:
                    out.append(StopIteration)
                    continue
                out.append(step[i])
                if any(kind == "done" for kind, _, _ in step[i]):
                    finished.add(i)
            yield out
        await work


def build(args: dict):
    """Application builder for ``serve run`` / a Serve config file / a RayService:
    ``args: {model, model_name?, max_batch_size?, batch_wait_timeout_s?, api_key_env?, replicas?, engine: {...}}``."""
    from cluster.serve.config import ServeConfig

    cfg = ServeConfig.from_args(args)
    return cfg.application()
