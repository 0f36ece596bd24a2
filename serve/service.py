"""What the gRPC and HTTP servers share: the server's phase, the engine once it is ready, the API key, the
in-flight requests (for a graceful drain), and one table from errors to HTTP / gRPC statuses.

Both protocols run one request the same way (`ServerState.generate`): refuse it unless the server is serving,
tokenize and validate it with the engine's `InputProcessor` (on a worker thread: a megabyte prompt must not stall
the event loop that streams everyone else's tokens), refuse a `max_tokens` that cannot fit the context, then
stream the `AsyncEngine`'s RequestOutputs. Cancelling the stream (client gone, deadline) aborts the request
in the engine, which frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from jaxinfer.engine_io import EngineRequest
from jaxinfer.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from jaxinfer.outputs import RequestOutput
from jaxinfer.processor import PromptInput
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams
from serve.metrics import ServerMetrics


class Phase(enum.Enum):
    LOADING = "loading"  # listeners up, weights loading
    WARMING_UP = "warming_up"  # compiling step buckets
    SERVING = "serving"
    DRAINING = "draining"  # shutting down: in-flight requests finish, new ones are refused
    STOPPED = "stopped"


class UnavailableError(RuntimeError):
    """The server is not serving (loading, warming up, draining)."""


class UnauthenticatedError(RuntimeError):
    pass


class NotFoundError(RuntimeError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class RequestTooLargeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    http_status: int
    grpc_code: grpc.StatusCode
    type: str  # OpenAI error type
    message: str
    param: str | None = None
    code: str | None = None


def classify(error: BaseException) -> ErrorInfo:
    """The status of an error. Only EngineError and unexpected exceptions are 500 / INTERNAL: a client mistake is
    never reported as a server fault, nor an engine fault as a client mistake."""
    if isinstance(error, InvalidRequestError):
        message = error.message if error.message.startswith(error.field) else f"{error.field}: {error.message}"
        return ErrorInfo(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", message, error.field)
    if isinstance(error, QueueFullError):
        return ErrorInfo(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error", str(error), None, error.limit)
    if isinstance(error, UnauthenticatedError):
        return ErrorInfo(401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error", str(error), None,
                         "invalid_api_key")
    if isinstance(error, NotFoundError):
        return ErrorInfo(404, grpc.StatusCode.NOT_FOUND, "not_found_error", str(error), error.param, error.code)
    if isinstance(error, RequestTooLargeError):
        return ErrorInfo(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_request_error", str(error), None,
                         "request_too_large")
    if isinstance(error, (UnavailableError, EngineClosedError)):
        return ErrorInfo(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable", str(error))
    what = str(error) if isinstance(error, EngineError) else f"internal error: {type(error).__name__}: {error}"
    return ErrorInfo(500, grpc.StatusCode.INTERNAL, "internal_error", what)


def top_logprobs(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of one position's logprob dict (which also holds the sampled token,
    ranked or not), most likely first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


PhaseListener = Callable[["Phase"], Awaitable[None]]


class ServerState:
    """Shared by the servers of one process. Lives on the event loop; the engine is attached once loaded."""

    def __init__(self, served_model_name: str, *, api_key: str | None = None,
                 metrics: ServerMetrics | None = None):
        self.served_model_name = served_model_name
        self.api_key = api_key or None
        self.metrics = metrics or ServerMetrics()
        self.engine = None  # an AsyncEngine, once attached
        self.phase = Phase.LOADING
        self.metrics.set_phase(self.phase.value)
        self._listeners: list[PhaseListener] = []
        self._inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------------------------------- lifecycle
    def add_phase_listener(self, fn: PhaseListener) -> None:
        self._listeners.append(fn)

    async def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.metrics.set_phase(phase.value)
        for fn in self._listeners:
            await fn(phase)

    def attach(self, engine) -> None:
        """Serve from this AsyncEngine (the phase still decides whether requests are taken)."""
        self.engine = engine
        self.metrics.bind(engine.stats)

    def detach(self) -> None:
        self.metrics.unbind()

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING and self.engine is not None

    def unavailable(self) -> UnavailableError:
        return UnavailableError(f"the server is {self.phase.value.replace('_', ' ')}; retry later")

    def require_serving(self):
        if not self.serving:
            raise self.unavailable()
        return self.engine

    def authorized(self, authorization: str | None) -> bool:
        """Whether an `authorization` header / metadata value carries the API key (any value when none is set).
        Constant-time comparison."""
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    async def drain(self, grace_s: float) -> int:
        """Stop taking requests, let in-flight ones finish for up to `grace_s`, then abort the rest (their
        streams end with finish_reason "abort"). Returns how many were aborted."""
        await self.set_phase(Phase.DRAINING)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(grace_s, 0.0))
            return 0
        except asyncio.TimeoutError:
            pass
        return await self.abort_all()

    async def abort_all(self) -> int:
        """Abort every in-flight request (their streams end with finish_reason "abort") and wait, up to 10 s,
        for the streams to end. Returns how many there were."""
        remaining = list(self._inflight)
        for request_id in remaining:
            await self.engine.abort(request_id)
        try:  # an aborted stream ends at the engine thread's next command drain
            await asyncio.wait_for(self._idle.wait(), timeout=10.0)
        except asyncio.TimeoutError:
            pass
        return len(remaining)

    # ------------------------------------------------------------------------------------------- requests
    def prepare(self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None, *,
                add_generation_prompt: bool = True) -> EngineRequest:
        """Tokenize and validate a request (UnavailableError, InvalidRequestError), refusing a max_tokens that
        cannot fit the context."""
        engine = self.require_serving()
        request = engine.processor.process(prompt, params, request_id, add_generation_prompt=add_generation_prompt)
        self._check_fits_context(request.prompt_token_ids, params)
        return request

    async def stream(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a prepared request's RequestOutputs (QueueFullError before the first one when admission
        refuses it). Closing or cancelling the stream aborts the request."""
        engine = self.require_serving()
        self._inflight.add(request.request_id)
        self._idle.clear()
        try:
            async for out in engine.generate(request.prompt_token_ids, request.params, request.request_id):
                yield out
        finally:
            self._inflight.discard(request.request_id)
            if not self._inflight:
                self._idle.set()

    def generate(self, prompt: PromptInput, params: SamplingParams, request_id: str | None = None, *,
                 add_generation_prompt: bool = True) -> AsyncIterator[RequestOutput]:
        """`stream(prepare(...))`: raises the validation errors at once, streams afterwards."""
        return self.stream(self.prepare(prompt, params, request_id, add_generation_prompt=add_generation_prompt))

    def _check_fits_context(self, prompt_ids: list[int], params: SamplingParams) -> None:
        limit = self.engine.engine.max_model_len
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens", f"the prompt has {len(prompt_ids)} tokens and max_tokens={params.max_tokens}: "
                              f"together more than the context length of {limit} tokens")

    def tokenize(self, prompt: PromptInput, *, add_special_tokens: bool = True,
                 add_generation_prompt: bool = True) -> list[int]:
        engine = self.require_serving()
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer")
            return engine.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return engine.processor.process(prompt, SamplingParams(), add_generation_prompt=add_generation_prompt
                                        ).prompt_token_ids

    def detokenize(self, token_ids: list[int]) -> str:
        engine = self.require_serving()
        vocab = engine.engine.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("tokens", f"tokens must be in [0, {vocab}), got {bad}")
        if engine.tokenizer is None:
            raise InvalidRequestError("tokens", "this model has no tokenizer")
        return engine.tokenizer.decode(token_ids)

    def token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else ""

    def model_info(self) -> dict:
        """Model and engine limits (gRPC ModelInfo, HTTP /v1/models)."""
        engine = self.require_serving().engine
        args, config, runner = engine.args, engine.config, engine.runner
        weight = runner.params.get("layers_0", {}).get("wq")
        snapshot = engine.stats.snapshot()
        return dict(
            model=self.served_model_name, model_path=args.model, architecture=config.architecture,
            context_length=engine.max_model_len, vocab_size=config.vocab_size,
            dtype=np.dtype(runner.model.dtype).name, kv_cache_dtype=np.dtype(runner.kv_cache[0][1].dtype).name,
            weight_dtype=np.dtype(weight.dtype).name if hasattr(weight, "dtype") else "quantized",
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size, num_kv_blocks=snapshot.kv_blocks_total,
            max_waiting_requests=args.max_waiting_requests, max_waiting_prompt_tokens=args.max_waiting_prompt_tokens,
            max_logprobs=MAX_LOGPROBS, eos_token_ids=sorted(engine.eos_token_ids), created=int(time.time()))
