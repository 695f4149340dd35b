"""The Ray Serve application: an OpenAI-compatible API (``GET /v1/models``,
``POST /v1/chat/completions`` with and without streaming) over any of our engines.

Concurrent requests are batched (``@serve.batch``): one engine call per batch and sampling setting,
run off the event loop, so the replica keeps answering (models, errors, other requests' streams)
while it generates. On the transformers engine a stream is real: tokens leave as they are decoded.
Each response carries ``x-cai-batch-size``, the number of requests generated together with it.

The bearer key: ``api_key_sha256`` (``cai serve --api-key-env`` hashes the variable in the driver, so
the key itself never reaches Ray) or ``api_key_env`` (the replica reads its own environment).

What a request may cost is bounded before its prompt is tokenized: the body (``max_body_bytes``,
counted as it arrives: 413), its messages and their characters (``max_messages``,
``max_prompt_chars``: 400); tokens are counted in a thread. Bad input is an OpenAI-style 4xx naming
the field, never a 5xx. A genuine fault is a 500 that quotes the request id, its traceback in the
replica's log only. A client that hangs up stops costing: its row of the batch ends at the next
decoding step (engines that take ``should_stop``), and decoding stops once no row is left.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime
import asyncio
import inspect
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from actors import EngineConfig, make_engine
from actors.base import Generation
from cluster.serve import protocol as oa
from cluster.serve.config import APP_NAME, ServeConfig
from cluster.serve.guard import Guard, RequestId, error_response, logger, new_api, server_error
from workflows.core.typed import from_dict

OVERLAPPING_BATCHES = 8  # batches in flight at once on an engine with concurrent_calls (vLLM)

api = new_api()


class _Job:
    """One request in a batch. ``cancelled`` (its client went away) is read by the engine's thread
    at every decoding step: the row ends there, and decoding stops once every row has."""

    __slots__ = ("req", "request_id", "finished", "cancelled")

    def __init__(self, req: oa.ChatRequest, request_id: RequestId):
        self.req, self.request_id = req, request_id
        self.finished = self.cancelled = False


class _Stream(StreamingResponse):
    """A stream that calls ``on_close`` however it ends: sent to the last byte, or cut off by the
    client (Serve cancels the request) before or while the body streams."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# Ctrl-C should stop a server within seconds: in-flight requests get 5 s, not Serve's default 20
@serve.deployment(name="ChatModel", max_ongoing_requests=64, graceful_shutdown_timeout_s=5,
                  graceful_shutdown_wait_loop_s=1)
@serve.ingress(api)
class ChatModel(Guard):
    def __init__(self, engine: dict, model_name: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.1,
                 api_key_sha256: str | None = None, api_key_env: str | None = None,
                 max_body_bytes: int = oa.DEFAULT_MAX_BODY_BYTES, max_messages: int = oa.DEFAULT_MAX_MESSAGES,
                 max_prompt_chars: int | None = None):
        self.cfg = from_dict(EngineConfig, engine, "serve engine")
        self.engine = make_engine(self.cfg)
        self.created = int(time.time())
        self.guard_setup(model_name, self.cfg.max_model_len, api_key_sha256, api_key_env, max_body_bytes,
                         max_messages, max_prompt_chars)
        accepts = inspect.signature(self.engine.generate).parameters
        self.streams_tokens, self.stops_rows = "on_tokens" in accepts, "should_stop" in accepts
        tok = getattr(self.engine, "tokenizer", None)
        self.decode = (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else None
        # what this replica did: requests answered by the engine, requests whose client left before
        # their answer, and tokens the engine decoded (every row, every step; streaming engines)
        self.counters = {"requests": 0, "cancelled": 0, "decoded_tokens": 0}
        # an engine that takes calls from several threads (vLLM: one stepping loop for all of them)
        # gets overlapping batches: a batch formed while others decode joins vLLM's running batch
        self._submit = self._overlapping if getattr(self.engine, "concurrent_calls", False) else self._generate
        self._submit.set_max_batch_size(max_batch_size)
        self._submit.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def stats(self) -> dict:
        """This replica's counters (through a Serve handle: ``handle.stats.remote()``)."""
        return dict(self.counters)

    # ------------------------------------------------------------------ routes
    @api.get("/v1/models")
    async def models(self, request: Request):
        return self.models_reply(request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        rid, req = await self.admit(request)
        if not isinstance(req, oa.ChatRequest):
            return req
        try:
            prompt_tokens = await asyncio.to_thread(self._count, req)  # a long prompt must not stall the loop
        except oa.RequestError as e:
            return error_response(e)
        cid = oa.completion_id()
        job = _Job(req, rid)
        events = self._submit(job)
        if req.stream:
            return _Stream(self._sse(cid, job, prompt_tokens, events), lambda: self._close(job),
                           media_type="text/event-stream")
        final, batch = None, 1
        try:
            async for step in events:
                for kind, value, size in step:
                    if kind == "done":
                        final, batch = value, size
        finally:
            self._close(job)
        failed = self._failure(final, job)
        if failed is not None:
            return failed
        body = oa.completion(cid, self.model_name, final.text, final.finish_reason,
                             final.prompt_tokens or prompt_tokens, final.completion_tokens)
        return JSONResponse(body, headers={"x-cai-batch-size": str(batch)})

    def _count(self, req: oa.ChatRequest) -> int:
        count = getattr(self.engine, "count_tokens", None)
        if count is None:
            return 0
        try:
            n = count(list(req.conversation))
        except Exception as e:
            if any(c.__module__.startswith("jinja2") for c in type(e).__mro__):  # the template's own refusal
                raise oa.RequestError(f"the model's chat template cannot format these messages: "
                                      f"{str(e)[:200]}", "messages", "invalid_conversation") from None
            raise
        oa.check_length(n, req, self.cfg.max_model_len)
        return n

    def _close(self, job: _Job) -> None:
        """The request's handler is done with its job: a job without its answer was cancelled."""
        if not job.finished and not job.cancelled:
            job.cancelled = True
            self.counters["cancelled"] += 1

    def _failure(self, g: Generation, job: _Job):
        """The response for a failed generation (None when it did not fail): 400 for what the client
        can fix, else a logged 500 with the request id."""
        if not g.error:
            return None
        if g.error.startswith("prompt_too_long"):  # engines that cannot count up front
            return error_response(oa.RequestError(f"{g.error} — shorten the messages or lower max_tokens",
                                                  "messages", "context_length_exceeded"))
        if g.error.startswith("bad_conversation"):
            return error_response(oa.RequestError("the model's chat template cannot format these messages",
                                                  "messages", "invalid_conversation"))
        logger.error("request %s: generation failed: %s", job.request_id, g.error)
        return server_error(job.request_id, "generation_failed")

    async def _sse(self, cid: str, job: _Job, prompt_tokens: int, events):
        req = job.req
        deltas = (oa.TextDeltas(self.decode, getattr(self.engine, "stop_ids", ()), req.params.stop)
                  if self.decode else None)
        yield oa.sse(oa.chunk(cid, self.model_name, {"role": "assistant", "content": ""}))
        try:
            async for step in events:
                for kind, value, _ in step:
                    if kind == "tokens" and deltas is not None:
                        text = deltas.push(value)
                        if text:
                            yield oa.sse(oa.chunk(cid, self.model_name, {"content": text}))
                    elif kind == "done":
                        g: Generation = value
                        failed = self._failure(g, job)
                        if failed is not None:
                            yield oa.sse(failed.body.decode())
                            yield oa.sse("[DONE]")
                            return
                        rest = deltas.finish(g.text) if deltas is not None else g.text
                        if rest:
                            yield oa.sse(oa.chunk(cid, self.model_name, {"content": rest}))
                        yield oa.sse(oa.chunk(cid, self.model_name, {}, g.finish_reason))
                        if req.include_usage:
                            yield oa.sse(oa.chunk(cid, self.model_name, {}, usage_=oa.usage(
                                g.prompt_tokens or prompt_tokens, g.completion_tokens)))
        except Exception:  # noqa: BLE001 — the status line is sent: the stream says it failed, the log why
            logger.exception("request %s: streaming failed", job.request_id)
            yield oa.sse(server_error(job.request_id).body.decode())
        yield oa.sse("[DONE]")

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)  # both set from the config in __init__
    async def _generate(self, jobs: list[_Job]):
        """One batch at a time (engines whose calls must not overlap)."""
        async for out in self._run_batch(jobs):
            yield out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1, max_concurrent_batches=OVERLAPPING_BATCHES)
    async def _overlapping(self, jobs: list[_Job]):
        """Batches that overlap (engines with ``concurrent_calls``)."""
        async for out in self._run_batch(jobs):
            yield out

    async def _run_batch(self, jobs: list[_Job]):
        """One engine call per sampling setting for the whole batch, in a thread. Yields, per request,
        the list of its new events: ``("tokens", ids, n)`` while decoding, then ``("done", Generation, n)``.
        A job cancelled before its call is left out of it; one cancelled during it ends its row there
        (engines that take ``should_stop``), and a call whose rows have all ended stops decoding."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        n = len(jobs)

        def emit(*event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def call(params, idx: list[int]) -> list[Generation]:
            extra = {}
            if self.streams_tokens:
                def on_tokens(row, ids):
                    self.counters["decoded_tokens"] += len(ids)
                    job = jobs[idx[row]]
                    if job.req.stream and not job.cancelled:
                        emit("tokens", idx[row], ids)
                extra["on_tokens"] = on_tokens
            if self.stops_rows:
                extra["should_stop"] = lambda row: jobs[idx[row]].cancelled
            try:
                return self.engine.generate([list(jobs[i].req.conversation) for i in idx], params, **extra)
            except Exception:  # noqa: BLE001 — the batch's requests get a 500, the server goes on
                logger.exception("requests %s: the engine failed", ", ".join(jobs[i].request_id for i in idx))
                return [Generation.failed("engine_error: see the log")] * len(idx)

        def run():
            groups: dict = {}
            for i, job in enumerate(jobs):
                groups.setdefault(job.req.params, []).append(i)
            for params, idx in groups.items():
                live = [i for i in idx if not jobs[i].cancelled]  # clients still there
                gens = call(params, live) if live else []
                for i, g in zip(live, gens):
                    if not g.error and not jobs[i].cancelled:
                        self.counters["requests"] += 1
                    emit("done", i, g)
                for i in set(idx) - set(live):
                    emit("done", i, Generation.failed("cancelled"))

        work = loop.run_in_executor(None, run)
        finished: set[int] = set()
        try:
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
                        jobs[i].finished = True
                yield out
        finally:
            for job in jobs:  # this batch ends early (its task cancelled): no row goes on decoding
                if not job.finished:
                    job.cancelled = True
        await work


def application(cfg: ServeConfig, key_hash: str | None = None):
    """The Serve application ``cfg`` describes: ``replicas`` copies of ``ChatModel``, or of Ray's
    ``LLMServer`` behind our gateway (``cfg.ray_llm``)."""
    if cfg.ray_llm:
        from cluster.serve import gateway  # ray.serve.llm: imported only where it serves

        return gateway.application(cfg, key_hash)
    opts = {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus}
    return ChatModel.options(num_replicas=cfg.replicas, ray_actor_options=opts).bind(
        engine=cfg.engine_config(), model_name=cfg.served_name, max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s, api_key_sha256=key_hash,
        api_key_env=None if key_hash else cfg.api_key_env, max_body_bytes=cfg.max_body_bytes,
        max_messages=cfg.max_messages, max_prompt_chars=cfg.max_prompt_chars)


def build(args: dict):
    """Application builder for ``serve run`` / a Serve config file / a RayService:
    ``args: {model, model_name?, max_batch_size?, batch_wait_timeout_s?, api_key_env?, replicas?, engine: {...}}``."""
    return application(ServeConfig.from_args(args))


def start(cfg: ServeConfig) -> str:
    """Deploy on the connected Ray cluster; returns the base URL once every replica is up."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg, cfg.key_hash()), name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}/v1"


def wait_until_interrupted(url: str, name: str) -> None:
    """Serve until Ctrl-C, then take the application down."""
    print(f"serving {name!r} at {url} — OpenAI-compatible (GET /models, POST /chat/completions); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping the server", flush=True)
    finally:
        serve.shutdown()  # deletes the application, then the controller and proxies
