"""jaxinfer: LLM inference on JAX/XLA with a paged KV cache and continuous batching."""
from jaxinfer.sampling_params import SamplingParams  # noqa: F401  (light import first)


def __getattr__(name):  # heavy modules (jax, transformers) load on first use
    if name == "LLM":
        from jaxinfer.llm import LLM
        return LLM
    if name in ("LLMEngine", "EngineArgs", "QueueFullError"):
        from jaxinfer import engine
        return getattr(engine, name)
    if name == "AsyncEngine":
        from jaxinfer.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "LLMEngine", "EngineArgs", "AsyncEngine", "QueueFullError"]
