"""Engine statistics: counters, gauges, per-request timings and per-step timings, in one place.

The engine core updates an `EngineStats` as it works; Prometheus metrics, benchmarks and `step_profile.py` read
it (`snapshot()`, `request_timings()`, `pop_finished()`) or subscribe to it (`add_request_listener`,
`add_step_listener`) instead of patching engine internals. The hot path pays one float append per request per
step (`RequestTimings.token_times`) and one `StepRecord` per step; everything else is per request or read on
demand. Listeners run on the thread that steps the engine and must be quick.

Reading from another thread (a metrics endpoint next to an `AsyncEngine`) is safe: counters are plain ints,
gauges are read from immutable or size-only state, and `snapshot()` copies what it returns.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

STEP_PARTS = ("schedule", "batch build", "dispatch", "device wait")


@dataclasses.dataclass(slots=True, eq=False)
class RequestTimings:
    """time.monotonic() stamps of one request. `token_times`: when each step that gave the request new tokens
    returned them (n == 1: one stamp per output token)."""
    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    num_samples: int = 1
    scheduled_time: float | None = None  # its first step was launched
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_time: float | None = None
    num_generation_tokens: int = 0
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)  # per sample

    @property
    def finish_reason(self) -> str | None:
        """The first sample's finish reason (the request's, when n == 1)."""
        return self.finish_reasons[0] if self.finish_reasons else None

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass(slots=True)
class StepRecord:
    """One completed model step. Times in seconds (perf_counter)."""
    num_scheduled_tokens: int  # real tokens
    bucket: int  # padded token count the step ran at
    num_seqs: int
    schedule_s: float  # Scheduler.schedule
    build_s: float  # host arrays for the step: the batch and the sampling tensors
    dispatch_s: float  # the jitted forward and sampler calls (asynchronous dispatch)
    wait_s: float  # the host blocked on the step's results
    device_s: float  # from when the device could start it (its launch, or the end of the step queued before it)
    # to when its results were back


@dataclasses.dataclass(frozen=True)
class StartupTimes:
    """Time to ready, in seconds, split by phase (docs/ARCHITECTURE.md, "Start-up"). Filled in by the engine as
    it starts; the executable figures keep growing while a background warm-up runs."""
    load_s: float = 0.0                # weights (checkpoint parse, dequantization, device placement) + tokenizer
    engine_build_s: float = 0.0        # KV cache allocation, model runner, scheduler
    trace_s: float = 0.0               # tracing the step functions (executables not in the executable cache)
    lower_s: float = 0.0               # lowering them to StableHLO
    compile_s: float = 0.0             # XLA compile (or a load from JAX's persistent compilation cache)
    executable_load_s: float = 0.0     # loading executables from the executable cache (and failed attempts)
    executable_store_s: float = 0.0    # writing newly compiled executables to it
    warmup_steps_s: float = 0.0        # one padding step per warmed bucket and sampling variant, block copies
    time_to_ready_s: float = 0.0       # load + engine build + the blocking part of warmup(): ready to serve
    num_executables_loaded: int = 0    # from the executable cache
    num_executables_compiled: int = 0  # traced, lowered and compiled this start
    num_executables_pending: int = 0   # a background warm-up is still providing these


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    # counters (only grow)
    num_requests: int
    num_prompt_tokens: int
    num_generation_tokens: int  # tokens the front end kept (tokens sampled past a stop string are not counted)
    num_preemptions: int
    prefix_cache_queried_tokens: int  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hit_tokens: int  # of those, served from cached blocks
    num_finished_requests: int
    finished_by_reason: dict[str, int]  # per sample: "stop", "length", "abort"
    num_steps: int
    num_compilations_after_warmup: int  # compiled step executables added since the last warmup() (should be 0)
    host_seconds: dict[str, float]  # time in each of STEP_PARTS, summed over steps
    # gauges (current values)
    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences queued (new or preempted)
    num_waiting_prompt_tokens: int  # prompt tokens of requests not yet scheduled
    kv_blocks_used: int
    kv_blocks_total: int
    startup: StartupTimes = StartupTimes()

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks referenced by live sequences."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0


class EngineStats:
    """Written by the engine core (one thread); read by anyone. `gauges` returns the scheduler-owned values of
    a snapshot (running, waiting, KV blocks, preemptions, prefix-cache tokens, compilations)."""

    def __init__(self, gauges: Callable[[], dict], keep_finished: int = 10_000):
        self._gauges = gauges
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished_requests = 0
        self.num_steps = 0
        self.finished_by_reason: dict[str, int] = {}
        self.host_seconds = dict.fromkeys(STEP_PARTS, 0.0)
        self._live: dict[str, RequestTimings] = {}
        self._finished: collections.deque[RequestTimings] = collections.deque(maxlen=keep_finished)
        self._request_listeners: list[Callable[[RequestTimings], None]] = []
        self._step_listeners: list[Callable[[StepRecord], None]] = []

    # ------------------------------------------------------------------------------------------- readers
    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            num_requests=self.num_requests, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, num_finished_requests=self.num_finished_requests,
            finished_by_reason=dict(self.finished_by_reason), num_steps=self.num_steps,
            host_seconds=dict(self.host_seconds), **self._gauges())

    def request_timings(self, request_id: str) -> RequestTimings | None:
        """A live request's timings (still being written), or a recently finished one's."""
        live = self._live.get(request_id)
        if live is not None:
            return live
        finished = list(self._finished)  # one atomic copy: the engine thread may be appending
        return next((t for t in reversed(finished) if t.request_id == request_id), None)

    def pop_finished(self) -> list[RequestTimings]:
        """Finished requests' timings since the last call (at most `keep_finished` of them), oldest first."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def add_request_listener(self, fn: Callable[[RequestTimings], None]) -> Callable[[], None]:
        """Call fn(timings) when a request finishes. Returns a function that unsubscribes."""
        self._request_listeners.append(fn)
        return lambda: self._request_listeners.remove(fn)

    def add_step_listener(self, fn: Callable[[StepRecord], None]) -> Callable[[], None]:
        """Call fn(record) after each completed step. Returns a function that unsubscribes."""
        self._step_listeners.append(fn)
        return lambda: self._step_listeners.remove(fn)

    # ------------------------------------------------------------------------------------- writers (core)
    def request_added(self, request_id: str, arrival_time: float, num_prompt_tokens: int,
                      num_samples: int) -> RequestTimings:
        timings = RequestTimings(request_id, arrival_time, num_prompt_tokens, num_samples,
                                 finish_reasons=[None] * num_samples)
        self._live[request_id] = timings
        self.num_requests += 1
        self.num_prompt_tokens += num_prompt_tokens
        return timings

    @staticmethod
    def request_scheduled(timings: RequestTimings, now: float) -> None:
        if timings.scheduled_time is None:
            timings.scheduled_time = now

    def tokens_generated(self, timings: RequestTimings, num_tokens: int, now: float) -> None:
        if timings.first_token_time is None:
            timings.first_token_time = now
        timings.token_times.append(now)
        timings.num_generation_tokens += num_tokens
        self.num_generation_tokens += num_tokens

    def tokens_dropped(self, timings: RequestTimings, num_tokens: int) -> None:
        """The front end ended a sequence on a stop string `num_tokens` tokens before the core's last one."""
        if num_tokens <= 0:
            return
        timings.num_generation_tokens -= num_tokens
        self.num_generation_tokens -= num_tokens
        if timings.num_samples == 1:  # one stamp per token: the dropped ones were never delivered
            del timings.token_times[len(timings.token_times) - num_tokens:]

    def sequence_finished(self, timings: RequestTimings, index: int, reason: str) -> None:
        timings.finish_reasons[index] = reason
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1

    def request_finished(self, timings: RequestTimings, now: float) -> None:
        # A request that ended on a generated token (not an abort) finished when that token arrived.
        ended_on_token = timings.token_times and any(r != "abort" for r in timings.finish_reasons)
        timings.finished_time = timings.token_times[-1] if ended_on_token else now
        self._live.pop(timings.request_id, None)
        self._finished.append(timings)
        self.num_finished_requests += 1
        for fn in self._request_listeners:
            fn(timings)

    def step_completed(self, record: StepRecord) -> None:
        self.num_steps += 1
        seconds = self.host_seconds
        seconds["schedule"] += record.schedule_s
        seconds["batch build"] += record.build_s
        seconds["dispatch"] += record.dispatch_s
        seconds["device wait"] += record.wait_s
        for fn in self._step_listeners:
            fn(record)
