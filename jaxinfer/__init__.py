"""jaxinfer: LLM inference on JAX/XLA with a paged KV cache and continuous batching."""
from jaxinfer.engine_args import EngineArgs  # noqa: F401  (light imports first)
from jaxinfer.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError  # noqa: F401
from jaxinfer.sampling_params import SamplingParams  # noqa: F401


def __getattr__(name):  # heavy modules (jax, transformers) load on first use
    if name == "LLM":
        from jaxinfer.llm import LLM
        return LLM
    if name == "LLMEngine":
        from jaxinfer.engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from jaxinfer.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "LLMEngine", "EngineArgs", "AsyncEngine", "QueueFullError",
           "InvalidRequestError", "EngineError", "EngineClosedError"]
