"""The vLLM backend of the engine protocol (GPU only; docs/engines.md).

Built on vLLM's offline API: one ``vllm.LLM`` per actor (prefix caching and tensor
parallelism from ``cfg.vllm``), prompts chat-templated and tokenized here with the engine's
own tokenizer and handed over as ``{"prompt_token_ids": ...}``, one ``vllm.SamplingParams``
per row. ``vllm`` is imported inside ``VLLMEngine.__init__`` only, so this module imports
(and its pure helpers are tested) on machines without it.

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
from pathlib import Path

from actors.base import EngineError, Generation, SamplingParams
from actors.config import EngineConfig
from actors.hf_engine import END_OF_TURN_TOKENS
from actors.models import resolve_model
from actors.openai_engine import conversation_key, row_seeds
from actors.precision import DtypeChoice

INSTALL_HINT = ("the vllm backend needs a CUDA GPU and `pip install cai-ray[vllm]` (vLLM pins torch "
                "exactly, e.g. vllm 0.28.0 needs torch 2.13.0) — on a CPU machine set engine.backend: "
                "transformers, or point engine.backend: openai at a vLLM server")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ---------------------------------------------------------------- pure helpers
def llm_kwargs(source, cfg: EngineConfig) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a resolved ``ModelSource``. A GGUF model is passed
    as the full ``.gguf`` path; its tokenizer is ``cfg.tokenizer``, else the GGUF's directory when
    that holds tokenizer files, else the ``.gguf`` itself (vLLM converts its embedded tokenizer)."""
    v = cfg.vllm
    model, tokenizer = source.path, cfg.tokenizer
    if source.gguf_file:
        model = str(Path(source.path) / source.gguf_file)
        if tokenizer is None:
            has_files = any((Path(source.path) / f).is_file() for f in _TOKENIZER_FILES)
            tokenizer = source.path if has_files else model
    dtype = v.dtype if v.dtype not in (None, "", "auto") else (cfg.dtype or "auto")
    kwargs = dict(model=model, tensor_parallel_size=v.tensor_parallel_size,
                  gpu_memory_utilization=v.gpu_memory_utilization, enable_prefix_caching=v.enable_prefix_caching,
                  max_model_len=v.max_model_len or cfg.max_model_len, dtype=_DTYPES.get(str(dtype).lower(), dtype),
                  seed=0, max_logprobs=max(20, v.top_logprobs),
                  worker_extension_cls="actors.vllm_engine.WeightLoader")  # RL weight sync (load_weights)
    if tokenizer:
        kwargs["tokenizer"] = tokenizer
    return kwargs


def vllm_precision(model_config, requested: str):
    """The dtype vLLM chose (its ``auto`` follows the checkpoint: fp32 checkpoints run in fp16/bf16)."""
    import torch

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
    strings crosses vLLM's RPC (a pickled function would need its insecure-serialization switch)."""

    def load_policy_weights(self, names: list, tensors: list) -> None:
        self.model_runner.model.load_weights(weights=list(zip(names, tensors)))


def end_of_turn_ids(tokenizer, markers) -> list[int]:
    """Ids of the end-of-turn ``markers`` the chat template uses (each also stops generation)."""
    template, vocab = str(getattr(tokenizer, "chat_template", None) or ""), tokenizer.get_vocab()
    return sorted({vocab[m] for m in markers if m in template and m in vocab})


# ---------------------------------------------------------------- the engine
class VLLMEngine:
    """``Engine`` on ``vllm.LLM``; ``name`` is ``vllm:<model label>``."""

    def __init__(self, cfg: EngineConfig):
        try:
            import vllm
        except Exception as e:  # noqa: BLE001 — ImportError, or a broken CUDA/torch install
            raise EngineError(f"{INSTALL_HINT} (import vllm failed: {type(e).__name__}: {e})") from e
        self.cfg, self._vllm = cfg, vllm
        self.source = resolve_model(cfg.model)
        kwargs = llm_kwargs(self.source, cfg)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"model {self.source.label!r}: vLLM could not load it from {self.source.path}: "
                              f"{type(e).__name__}: {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.name = f"vllm:{self.source.label}"
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len = int(getattr(model_config, "max_model_len", None) or cfg.vllm.max_model_len
                                 or cfg.max_model_len)
        self.stop_ids = end_of_turn_ids(self.tokenizer, END_OF_TURN_TOKENS)
        self.device = "cuda"
        self.precision = vllm_precision(model_config, kwargs["dtype"])
        print(f"[engine] {self.name} on cuda, {self.precision}", flush=True)

    def _encode(self, conversation) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant-turn header."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, conversation) -> int:
        return len(self._encode(conversation))

    def _run(self, prompts: list[dict], sps: list, convert, on_error) -> list:
        """``llm.generate`` on all prompts; if vLLM raises, prompt by prompt to isolate the bad row."""
        if not prompts:
            return []
        try:
            return [convert(o) for o in self.llm.generate(prompts, sps, use_tqdm=False)]
        except Exception:  # noqa: BLE001
            out = []
            for p, sp in zip(prompts, sps):
                try:
                    out.extend(convert(o) for o in self.llm.generate([p], [sp], use_tqdm=False))
                except Exception as e:  # noqa: BLE001
                    out.append(on_error(f"generate_error: {type(e).__name__}: {e}"))
            return out

    def generate(self, conversations, params: SamplingParams) -> list[Generation]:
        """One assistant reply per conversation, in input order (see the module docstring)."""
        if params.max_new_tokens < 1:
            raise EngineError(f"sampling.max_new_tokens must be ≥ 1, got {params.max_new_tokens}")
        encoded, errors = encode_rows(self._encode, conversations, self.max_model_len - params.max_new_tokens)
        ok = [i for i in range(len(conversations)) if i not in errors]
        seeds = row_seeds(params.seed, [conversation_key(conversations[i]) for i in ok])
        sps = [self._vllm.SamplingParams(**sampling_kwargs(params, s, self.stop_ids)) for s in seeds]
        results = self._run([{"prompt_token_ids": encoded[i]} for i in ok], sps, to_generation, Generation.failed)
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
        self.llm.reset_prefix_cache()
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
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.vllm.top_logprobs)
        rows = self._run([{"prompt_token_ids": encoded[i]} for i in ok], [sp] * len(ok),
                         lambda o: choice_row(o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}, choice_ids),
                         nan_row)
        return reassemble(len(conversations), errors, ok, rows, nan_row)
