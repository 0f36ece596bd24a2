"""AsyncEngine: the engine core stepped by a background thread, with an asyncio stream per request.

The servers (gRPC, OpenAI HTTP) use this. The split follows vLLM V1: the engine thread runs only the
`EngineCore` (scheduling and device work) and hands each step's token deltas to the callers; everything about
text runs in the caller's coroutine: the `InputProcessor` (tokenizing, chat templates, validation) before the
request reaches the thread, and a `RequestState` (detokenization, stop strings, building RequestOutputs) per
stream. A stop string found there goes back to the core as a finish command.

Requests, aborts and finishes reach the thread through a lock-protected command list, applied in order between
steps; deltas go back with one `call_soon_threadsafe` per event loop per step. A stream that is closed or
cancelled (client disconnect) aborts its request, which frees its KV blocks at the next step boundary;
`abort(request_id)` from elsewhere ends the stream with a final output whose finish_reason is "abort".
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import AsyncIterator

from jaxinfer.engine import EngineArgs, LLMEngine
from jaxinfer.engine_io import EngineRequest, RequestDelta
from jaxinfer.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from jaxinfer.output_processor import RequestState, StopStringFinish
from jaxinfer.outputs import RequestOutput
from jaxinfer.processor import PromptInput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.stats import EngineStats


@dataclasses.dataclass(frozen=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestDelta items, or an exception that ends the stream


# Commands to the engine thread.
@dataclasses.dataclass(frozen=True)
class _Add:
    request: EngineRequest


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, **engine_args):
        self.engine = engine or LLMEngine(EngineArgs(**engine_args))
        self.core = self.engine.core
        self.processor = self.engine.processor
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[_Add | _Abort | StopStringFinish] = []
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    async def generate(self, prompt: PromptInput, params: SamplingParams | None = None,
                       request_id: str | None = None, *, add_generation_prompt: bool = True
                       ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request: `prompt` is text, token ids or chat messages. A bad request
        raises InvalidRequestError, a full queue QueueFullError, before anything streams."""
        request = self.processor.process(prompt, params, request_id, add_generation_prompt=add_generation_prompt)
        request_id = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped:
                raise EngineClosedError("the engine is shut down")
            if request_id in self._streams:
                raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue)
            self._commands.append(_Add(request))
        self._wake.set()
        state = RequestState(request, self.tokenizer)
        finished = False
        try:
            # The first item is an admission error (queue full, id in use) or the first tokens.
            while not finished:
                items = [await queue.get()]
                while not queue.empty():  # fell behind: merge what is there into one output
                    items.append(queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    stops = state.process(item)
                    if stops:
                        self._send(*stops)
                finished = state.finished
                if finished or any(o.delta_token_ids for o in state.outputs):
                    yield state.make_output()
        finally:
            with self._lock:
                if self._streams.pop(request_id, None) is not None and not finished:
                    self._commands.append(_Abort(request_id))  # consumer went away early: free its blocks
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request: its KV blocks are freed at the next step boundary and its stream ends with a final
        output whose finish_reason is "abort". Unknown or finished requests are ignored."""
        self._send(_Abort(request_id))

    def metrics(self) -> dict:
        return self.engine.metrics()

    def shutdown(self) -> None:
        """Stop the engine thread. Open streams end with EngineClosedError and their requests are aborted."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _send(self, *commands) -> None:
        with self._lock:
            self._commands.extend(commands)
        self._wake.set()

    # ------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stopped:
            try:
                self._run_once()
            except Exception as e:  # a broken step fails every open stream instead of hanging them
                error = EngineError(f"engine step failed: {type(e).__name__}: {e}")
                error.__cause__ = e
                self._fail_all(error)
        # Aborts and stop-string finishes sent before shutdown still apply, so no request outlives its stream in
        # the core (which a shared LLMEngine keeps).
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            if not isinstance(command, _Add):
                self._apply(command)
        self._fail_all(EngineClosedError("the engine was shut down"))

    def _run_once(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            self._apply(command)
        if not self.core.has_unfinished_requests():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        self._deliver(self.core.step())

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            delta = self.core.abort_request(command.request_id)
            if delta is not None:
                self._deliver([delta])
        elif isinstance(command, StopStringFinish):
            self.core.finish_sequence(command.request_id, command.index, command.num_output_tokens)
        else:
            request_id = command.request.request_id
            with self._lock:
                stream = self._streams.get(request_id)
            if stream is None:
                return  # the caller went away before its request was queued
            try:
                self.core.add_request(command.request)
            except (InvalidRequestError, QueueFullError) as e:  # refused: that caller's error only
                with self._lock:
                    self._streams.pop(request_id, None)
                _call_in_loop(stream.loop, stream.queue.put_nowait, e)

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for delta in deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:  # else the consumer went away; its abort is queued
                    by_loop.setdefault(stream.loop, []).append((stream.queue, delta))
        for loop, items in by_loop.items():
            if not _call_in_loop(loop, _put_all, items):  # its event loop is gone: nobody listens
                for _, delta in items:
                    with self._lock:
                        self._streams.pop(delta.request_id, None)
                    self.core.abort_request(delta.request_id)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self.core.abort_request(request_id)
            _call_in_loop(stream.loop, stream.queue.put_nowait, error)


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Schedule fn(*args) on the stream's event loop; False when that loop has closed (its caller is gone),
    which must not kill the engine thread."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
