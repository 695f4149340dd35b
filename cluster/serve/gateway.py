"""``cai serve`` on Ray's own LLM serving (``server: ray-llm``): our checks as the ingress, in front of
``ray.serve.llm``'s ``LLMServer`` — vLLM's async engine with continuous batching and streaming.

A request passes the same gate as on our own app (``cluster.serve.guard``: the bearer key, the body
within its byte limit, every field validated, request ids, OpenAI-shaped errors), then goes to the
``LLMServer`` deployment through a Serve handle; the gateway re-emits a stream in our chunk format,
and an answer in our completion format. An upstream
4xx (a prompt longer than the model takes) reaches the client as the same 4xx; anything else is a 500
quoting the request id, its cause in the replica's log. A client that hangs up cancels the handle
call, and Serve cancels the ``LLMServer`` call under it, which aborts the request in vLLM. A
streaming client's request is streamed upstream; any other asks for the whole answer at once.

``CaiLLMServer`` is Ray's ``LLMServer`` with the model resolved (``embedded``: its converted
directory) and the number format chosen on the replica's own node, and counters of what it decoded.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from actors import EngineConfig
from actors.models import choose, prepare_model, resolve_device
from actors.vllm_engine import llm_kwargs, requested_dtype, runtime_settings
from cluster.serve import protocol as oa
from cluster.serve.config import ServeConfig
from cluster.serve.guard import Guard, RequestId, error_response, logger, new_api, server_error
from workflows.core.typed import from_dict

api = new_api()
# what vLLM's engine takes from our engine settings (the model itself comes from LLMConfig; the seed,
# logprob and worker-extension settings are our batch engine's)
ENGINE_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "enable_prefix_caching", "max_model_len", "dtype",
               "tokenizer", "enforce_eager", "kv_cache_memory_bytes")


def engine_kwargs(cfg: EngineConfig, model_dir: str, device: str, max_num_seqs: int) -> dict:
    """vLLM's engine arguments for ``cfg`` on ``device``, as our vLLM engine would load it (on a CPU:
    bfloat16 only where the processor has it natively, eager mode, a fixed KV cache)."""
    dtype = choose(requested_dtype(cfg), "cpu", setting="engine.vllm.dtype").name if device == "cpu" \
        else requested_dtype(cfg)
    _, runtime = runtime_settings(cfg, device, max(1, int(cfg.num_cpus)))
    every = {**llm_kwargs(model_dir, cfg, dtype), **runtime}
    return {**{k: every[k] for k in ENGINE_KEYS if k in every}, "max_num_seqs": max_num_seqs}


class CaiLLMServer(LLMServer):
    """``LLMServer`` whose model and engine arguments are resolved on the replica's node (a cluster's
    nodes differ from the driver's), counting requests answered, requests cancelled, and the answer
    pieces its engine decoded (``stats``)."""

    async def __init__(self, llm_config: LLMConfig, *, engine: dict, max_num_seqs: int):
        cfg = from_dict(EngineConfig, engine, "serve engine")
        started = time.time()
        source = prepare_model(cfg.model)
        # the engine config the driver built (and cached) is updated with this node's answers
        llm_config.model_loading_config.model_source = source.path
        llm_config.get_engine_config().hf_model_id = source.path
        llm_config.update_engine_kwargs(**engine_kwargs(cfg, source.path, resolve_device(cfg.device).type,
                                                        max_num_seqs))
        # requests answered, ended by an error (vLLM's abort included), closed early; answer pieces
        # decoded; requests in progress
        self.counters = {"requests": 0, "failed": 0, "cancelled": 0, "decoded_tokens": 0, "running": 0}
        await super().__init__(llm_config)
        print(f"[engine] ray.serve.llm LLMServer: vllm:{source.label}, {llm_config.engine_kwargs['dtype']}, "
              f"loaded in {time.time() - started:.1f} s", flush=True)

    def stats(self) -> dict:
        """The counters, and ``unfinished``: requests vLLM's engine still holds (None where this Ray
        version's engine wrapper does not expose vLLM's client)."""
        client = getattr(self.engine, "_engine_client", None)  # Ray's VLLMEngine → vLLM's AsyncLLM
        unfinished = client.get_num_unfinished_requests() if hasattr(client, "get_num_unfinished_requests") else None
        return {**self.counters, "unfinished": unfinished}

    async def chat(self, request, raw_request_info=None):
        self.counters["running"] += 1
        try:
            stream = await super().chat(request, raw_request_info)
        except BaseException:
            self.counters["running"] -= 1
            raise
        return self._counted(stream)

    async def _counted(self, stream):
        finished = failed = False
        try:
            async for item in stream:  # a stream's chunks (one per token), or one whole answer
                for event in oa.stream_events(item):
                    said = oa.Upstream.of(event)
                    failed = failed or said.error is not None
                    whole = "message" in ((event.get("choices") or [{}])[0])
                    self.counters["decoded_tokens"] += (said.usage or {}).get("completion_tokens", 0) if whole \
                        else bool(said.content)
                yield item
            finished = True
        finally:
            self.counters["running"] -= 1
            self.counters["cancelled" if not finished else "failed" if failed else "requests"] += 1


async def _upstream(events):
    """The upstream stream as ``Upstream`` events (one item of it can carry several). Defined above
    the ingress class: Serve pickles the routes when the class is made, with the globals there then."""
    async for item in events:
        for event in oa.stream_events(item):
            yield oa.Upstream.of(event)


# Ctrl-C should stop a server within seconds: in-flight requests get 5 s, not Serve's default 20
# no CPU of its own: it only checks and relays, and the engine's bundle should get every core
@serve.deployment(name="Gateway", max_ongoing_requests=256, graceful_shutdown_timeout_s=5,
                  graceful_shutdown_wait_loop_s=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway(Guard):
    def __init__(self, llm, model_name: str, max_model_len: int, api_key_sha256: str | None = None,
                 api_key_env: str | None = None, max_body_bytes: int = oa.DEFAULT_MAX_BODY_BYTES,
                 max_messages: int = oa.DEFAULT_MAX_MESSAGES, max_prompt_chars: int | None = None):
        self.guard_setup(model_name, max_model_len, api_key_sha256, api_key_env, max_body_bytes, max_messages,
                         max_prompt_chars)
        self.llm, self.streamed = llm, llm.options(stream=True)
        self.created = int(time.time())

    async def stats(self) -> dict:
        """The model server's counters (through a Serve handle: ``handle.stats.remote()``)."""
        return await self.llm.stats.remote()

    @api.get("/v1/models")
    async def models(self, request: Request):
        return self.models_reply(request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        rid, req = await self.admit(request)
        if not isinstance(req, oa.ChatRequest):
            return req
        events = self.streamed.chat.remote(ChatCompletionRequest(**oa.upstream_body(req, self.model_name)), None)
        items = _upstream(events)
        try:
            first = await anext(items, None)
        except BaseException:
            events.cancel()
            raise
        if first is not None and first.error is not None:
            return self._refused(first.error, rid)
        cid = oa.completion_id()
        if req.stream:
            return StreamingResponse(self._sse(cid, req, rid, first, items, events), media_type="text/event-stream")
        text, reason, usage = [], None, None
        try:
            item = first
            while item is not None:
                if item.error is not None:
                    return self._refused(item.error, rid)
                text.append(item.content)
                reason, usage = item.finish_reason or reason, item.usage or usage
                item = await anext(items, None)
        finally:
            events.cancel()  # a no-op once the stream has ended; a client gone stops vLLM
        usage = usage or {}
        return JSONResponse(oa.completion(cid, self.model_name, "".join(text), reason or "stop",
                                          usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))

    def _refused(self, error: dict, rid: RequestId) -> JSONResponse:
        mine = oa.upstream_error(error)
        if mine is not None:
            return error_response(mine)
        logger.error("request %s: the model server failed: %s", rid, error)
        return server_error(rid, "generation_failed")

    async def _sse(self, cid: str, req: oa.ChatRequest, rid: RequestId, first, items, events):
        yield oa.sse(oa.chunk(cid, self.model_name, {"role": "assistant", "content": ""}))
        try:
            item = first
            while item is not None:
                if item.error is not None:
                    yield oa.sse(self._refused(item.error, rid).body.decode())
                    break
                if item.content:
                    yield oa.sse(oa.chunk(cid, self.model_name, {"content": item.content}))
                if item.finish_reason:
                    yield oa.sse(oa.chunk(cid, self.model_name, {}, item.finish_reason))
                if item.usage and req.include_usage:
                    u = item.usage
                    yield oa.sse(oa.chunk(cid, self.model_name, {}, usage_=oa.usage(
                        u.get("prompt_tokens", 0), u.get("completion_tokens", 0))))
                item = await anext(items, None)
        except Exception:  # noqa: BLE001 — the status line is sent: the stream says it failed, the log why
            logger.exception("request %s: streaming failed", rid)
            yield oa.sse(server_error(rid).body.decode())
        finally:
            events.cancel()  # the client hung up (this generator closed early): vLLM stops decoding
        yield oa.sse("[DONE]")


def application(cfg: ServeConfig, key_hash: str | None = None):
    """``LLMServer`` (``replicas`` copies) behind one ``Gateway``, both from ``cfg``."""
    eng = cfg.engine_config()
    source = prepare_model(cfg.model)  # the driver's copy, for the deployment options; replicas resolve their own
    cpu = not cfg.engine.num_gpus
    llm = LLMConfig(model_loading_config={"model_id": cfg.served_name, "model_source": source.path},
                    accelerator_config={"kind": "cpu"} if cpu else None,
                    # on a CPU the replica and its engine share one bundle of engine.num_cpus
                    deployment_config={"num_replicas": cfg.replicas,
                                       **({"ray_actor_options": {"num_cpus": 0}} if cpu else {})},
                    placement_group_config={"bundles": [{"CPU": cfg.engine.num_cpus}]} if cpu else None,
                    engine_kwargs={"max_model_len": cfg.engine.max_model_len}, log_engine_metrics=False)
    server = build_llm_deployment(llm, deployment_cls=CaiLLMServer, name_prefix="cai:",
                                  bind_kwargs={"engine": eng, "max_num_seqs": cfg.max_batch_size})
    return Gateway.bind(server, model_name=cfg.served_name, max_model_len=cfg.engine.vllm.max_model_len
                        or cfg.engine.max_model_len, api_key_sha256=key_hash,
                        api_key_env=None if key_hash else cfg.api_key_env, max_body_bytes=cfg.max_body_bytes,
                        max_messages=cfg.max_messages, max_prompt_chars=cfg.max_prompt_chars)
