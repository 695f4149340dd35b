"""Inference engines (transformers, vLLM, OpenAI-compatible HTTP) behind one protocol."""
from actors.base import Engine, EngineError, Generation, SamplingParams
from actors.config import EngineConfig, OpenAIOptions, VLLMOptions


def make_engine(cfg: EngineConfig) -> Engine:
    """Build the engine ``cfg.backend`` names. Backends import their heavy deps lazily,
    so a CPU machine without vLLM can still use the others."""
    if cfg.backend == "transformers":
        from actors.hf_engine import TransformersEngine

        return TransformersEngine(cfg)
    if cfg.backend == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    if cfg.backend == "openai":
        from actors.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg)
    raise EngineError(f"engine.backend: unknown backend {cfg.backend!r}; use transformers, vllm or openai")


__all__ = ["Engine", "EngineConfig", "EngineError", "Generation", "OpenAIOptions", "SamplingParams",
           "VLLMOptions", "make_engine"]
