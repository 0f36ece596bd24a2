"""The errors a front end (gRPC, HTTP, CLI) tells apart, so it can answer each with the right status.

- `InvalidRequestError`: the client sent something wrong; it names the offending field. HTTP 400, gRPC
  INVALID_ARGUMENT. A `ValueError`, so `except ValueError` keeps working.
- `QueueFullError`: admission control refused the request for now; retrying later may succeed. HTTP 429, gRPC
  RESOURCE_EXHAUSTED.
- `EngineError`: the engine itself failed (a bug or a device fault), never the client's doing. HTTP 500, gRPC
  INTERNAL. A step that raises is wrapped in it, so no exception from inside the engine (a stray ValueError in
  a library, say) can pass for a client mistake.
- `EngineClosedError`: the engine is shut down or shutting down. HTTP 503, gRPC UNAVAILABLE.

No heavy imports here: `sampling_params` (which must stay light) raises `InvalidRequestError`.
"""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A bad request: `field` names what is wrong ("temperature", "prompt", "messages", ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def __reduce__(self):  # picklable with both arguments (multiprocessing, test workers)
        return type(self), (self.field, self.message)


class QueueFullError(RuntimeError):
    """Too many requests (or prompt tokens) are waiting; the caller should retry later. `limit` names the engine
    option that refused it ("max_waiting_requests" or "max_waiting_prompt_tokens")."""

    def __init__(self, message: str, limit: str = "max_waiting_requests"):
        super().__init__(message)
        self.limit = limit

    def __reduce__(self):
        return type(self), (str(self), self.limit)


class EngineError(RuntimeError):
    """An internal fault of the engine (its `__cause__` is the original exception)."""


class EngineClosedError(RuntimeError):
    """The engine no longer accepts requests (it was shut down)."""
