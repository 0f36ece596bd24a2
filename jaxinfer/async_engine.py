"""AsyncEngine: the LLMEngine driven by a background thread, with asyncio streams per request.

The servers (gRPC, OpenAI HTTP) use this. One thread owns the engine and runs steps while any request is
unfinished; requests and aborts reach it through a lock-protected inbox, and outputs go back to each request's
asyncio queue with `call_soon_threadsafe`. A stream that is closed or cancelled (client disconnect) aborts its
request, which frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from typing import AsyncIterator

from jaxinfer.engine import EngineArgs, LLMEngine
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, **engine_args):
        self.engine = engine or LLMEngine(EngineArgs(**engine_args))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request. Invalid input raises ValueError before anything streams."""
        request_id = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        done = asyncio.get_running_loop().create_future()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((prompt, params, request_id, done))
        self._wake.set()
        finished = False
        try:
            await done  # the engine thread validated and queued it (or raised the validation error)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                if self._streams.pop(request_id, None) is not None and not finished:
                    self._aborts.append(request_id)  # consumer went away early: free its blocks
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def metrics(self) -> dict:
        return self.engine.metrics()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                self.engine.abort_request(request_id)
            for prompt, params, request_id, done in adds:
                loop = self._streams.get(request_id, (None,))[0]
                try:
                    if isinstance(prompt, str):
                        self.engine.add_request(prompt, params, request_id=request_id)
                    else:
                        self.engine.add_request(None, params, request_id=request_id, prompt_token_ids=prompt)
                    _resolve(loop, done, None)
                except Exception as e:  # bad input: report to that caller only; the engine keeps serving
                    with self._lock:
                        self._streams.pop(request_id, None)
                    _resolve(loop, done, e)
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails every open stream instead of hanging them
                with self._lock:
                    streams = list(self._streams.items())
                for request_id, (loop, queue) in streams:
                    self.engine.abort_request(request_id)
                    _call_in_loop(loop, queue.put_nowait, e)
                continue
            for out in outputs:
                with self._lock:
                    target = self._streams.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    if not _call_in_loop(loop, queue.put_nowait, out):  # its event loop is gone: nobody listens
                        with self._lock:
                            self._streams.pop(out.request_id, None)
                        self.engine.abort_request(out.request_id)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Schedule fn(*args) on the stream's event loop; False when that loop has closed (its caller is gone),
    which must not kill the engine thread."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(loop, future, error) -> None:
    if loop is None:
        return

    def set_result():
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    _call_in_loop(loop, set_result)
