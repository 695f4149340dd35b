"""What ``cai serve``, a Serve config file and the recipe's ``serve`` stage share: one typed config.
The application it builds, and how it is started and stopped, live beside the app (``cluster.serve.app``)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from actors.config import EngineConfig
from workflows.core.errors import ConfigError
from workflows.core.typed import check_fields, from_dict, to_dict

APP_NAME = "cai"
SERVERS = ("auto", "cai", "ray-llm")
# what `server: auto` picks for a vllm backend: Ray's LLMServer behind our checks matched our app's
# requests/s at concurrency 16 and beat it by 1.19x at 1 (benchmarks/serve.py, docs/engines.md)
SERVER_AUTO = "ray-llm"


@dataclass
class ServeConfig:
    """``model``: ``embedded``, a Hugging Face model directory (a training stage's output) or a ``.gguf``.
    ``model_name``: the id clients send (default: the model directory's name). ``host`` is loopback
    unless told otherwise; ``api_key_env`` names the variable holding the bearer key (never the key)."""

    model: str = "embedded"
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch_size: int = 8  # concurrent requests generated together
    # how long a batch waits to fill: with 0.01 s, requests that came back a moment late made half
    # batches (mean 6 of 16 at concurrency 16, 1.9x a naive server); with 0.1 s, 16 of 16 (6.6x) —
    # small next to the seconds a CPU batch takes (benchmarks/serve.py)
    batch_wait_timeout_s: float = 0.1
    api_key_env: str | None = None
    # what one request may cost, checked before its prompt is tokenized: a bigger body is a 413, more
    # messages or characters a 400; max_prompt_chars None is 32 characters per token of engine.max_model_len
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompt_chars: int | None = None
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=2048))
    # who serves: `cai`, our app over the engine (batches of max_batch_size, any backend); `ray-llm`,
    # Ray's LLMServer (vLLM's async engine, continuous batching) behind our checks, vllm backend only;
    # `auto`: ray-llm for a vllm backend (SERVER_AUTO, measured), our app otherwise
    server: str = "auto"

    def validate(self, where: str) -> None:
        check_fields(self, where, [
            ("port", not 0 < self.port < 65536, "a TCP port, e.g. 8000"),
            ("replicas", self.replicas < 1, "at least 1"),
            ("max_batch_size", self.max_batch_size < 1, "at least 1"),
            ("batch_wait_timeout_s", self.batch_wait_timeout_s < 0, "0 or more seconds"),
            ("max_body_bytes", self.max_body_bytes < 1024, "at least 1024 bytes, e.g. 1048576 (1 MiB)"),
            ("max_messages", self.max_messages < 1, "at least 1"),
            ("max_prompt_chars", self.max_prompt_chars is not None and self.max_prompt_chars < 1,
             "at least 1, or null for 32 characters per token of engine.max_model_len"),
            ("engine.backend", self.engine.backend == "openai",
             "serve a model of ours (transformers or vllm); an OpenAI endpoint is already a server"),
            ("server", self.server not in SERVERS, f"one of {', '.join(SERVERS)}"),
            ("server", self.server == "ray-llm" and self.engine.backend != "vllm",
             "ray-llm serves with vLLM: set engine.backend: vllm (cai serve --backend vllm), or server: cai"),
        ])
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(f"{where}.api_key_env", f"{self.api_key_env!r} is not an environment variable name",
                              "name the variable that holds the key (e.g. CAI_API_KEY), not the key itself")

    @classmethod
    def from_args(cls, args: dict, where: str = "serve args") -> "ServeConfig":
        return from_dict(cls, dict(args or {}), where)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return "embedded" if self.model == "embedded" else Path(self.model.rstrip("/")).name

    @property
    def ray_llm(self) -> bool:
        """Served by Ray's LLMServer behind our gateway (``server: ray-llm``, or ``auto`` where it is the pick)."""
        return self.server == "ray-llm" or (self.server == "auto" and self.engine.backend == "vllm"
                                             and SERVER_AUTO == "ray-llm")

    def engine_config(self) -> dict:
        eng = to_dict(self.engine)
        eng["model"] = self.model
        eng["batch_size"] = max(int(eng.get("batch_size") or 1), self.max_batch_size)  # a batch is one micro-batch
        eng["concurrency"] = 1
        return eng

    def key_hash(self) -> str | None:
        """The bearer key's SHA-256, read here from ``api_key_env``: the key itself never reaches Ray."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError("api_key_env", f"the variable {self.api_key_env} is not set or empty",
                              f"export {self.api_key_env}=<key> before starting the server")
        return hashlib.sha256(key.encode()).hexdigest()
