"""Inference engines (transformers, vLLM, OpenAI-compatible HTTP) behind one protocol."""
from actors.base import Engine, EngineError, Generation, SamplingParams
from actors.config import EngineConfig, OpenAIOptions, VLLMOptions
from actors.install import choose_backend, has_cuda, vllm_installed


def resolve_backend(cfg: EngineConfig) -> tuple[str, str]:
    """``(backend, why)``: ``cfg.backend``, with ``auto`` decided on this machine (``actors.install``)."""
    if cfg.backend != "auto":
        return choose_backend(cfg.backend, False, False)
    return choose_backend("auto", has_cuda(cfg.device), vllm_installed())


def make_engine(cfg: EngineConfig) -> Engine:
    """Build the engine ``cfg.backend`` names (``auto``: see ``resolve_backend``); the engine's
    ``backend_reason`` says why it runs. Backends import their heavy deps lazily, so a CPU
    machine without vLLM can still use the others."""
    backend, why = resolve_backend(cfg)
    if backend == "transformers":
        from actors.hf_engine import TransformersEngine as Engine_
    elif backend == "vllm":
        from actors.vllm_engine import VLLMEngine as Engine_
    elif backend == "openai":
        from actors.openai_engine import OpenAIEngine as Engine_
    else:
        raise EngineError(f"engine.backend: unknown backend {cfg.backend!r}; use auto, transformers, vllm or openai")
    engine = Engine_(cfg)
    engine.backend_reason = why
    return engine


__all__ = ["Engine", "EngineConfig", "EngineError", "Generation", "OpenAIOptions", "SamplingParams",
           "VLLMOptions", "make_engine", "resolve_backend"]
