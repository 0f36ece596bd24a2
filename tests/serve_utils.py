"""Helpers of the server tests: offline reference runs, holding the engine thread, waiting for an idle pool."""
from __future__ import annotations

import threading
import time

HANG = 600  # seconds: bounds that only turn a hang into a failure (a busy machine may compile for minutes)


def offline(engine, prompt, params):
    """The final RequestOutput of one request run alone on a synchronous LLMEngine (the servers' oracle)."""
    request_id = engine.add_request(prompt, params)
    final = None
    for _ in range(10_000):  # bounded: a request is never longer than max_model_len steps
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                final = out
    assert final is not None
    return final


def is_idle(stats) -> bool:
    s = stats.snapshot()
    return s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0


def wait_idle(stats, timeout: float = 120.0) -> bool:
    """Poll until no sequence holds a KV block (an abort is applied at the engine's next step boundary)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_idle(stats):
            return True
        time.sleep(0.02)
    return False


class EngineGate:
    """Holds the engine thread at the end of the first step after which `predicate()` holds, until `open()`: a
    test can then act (cancel, let a deadline pass, disconnect) while the engine is known to be mid-request."""

    def __init__(self, stats, predicate):
        self.paused, self._release = threading.Event(), threading.Event()
        self._predicate = predicate
        self._unsubscribe = stats.add_step_listener(self._on_step)

    def _on_step(self, _record) -> None:
        try:
            reached = not self.paused.is_set() and self._predicate()
        except Exception as e:  # noqa: BLE001  (never into the engine's step: it would fail every request)
            self.error = e
            reached = True
        if reached:
            self.paused.set()
            self._release.wait(HANG)

    error: Exception | None = None

    def wait_paused(self) -> bool:
        if not self.paused.wait(HANG):
            return False
        if self.error is not None:
            raise self.error
        return True

    def open(self) -> None:
        self._release.set()
        self._unsubscribe()

    def __enter__(self) -> "EngineGate":
        return self

    def __exit__(self, *exc) -> None:
        self.open()
