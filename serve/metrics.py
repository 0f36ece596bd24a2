"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process).

Engine counters and gauges are read from `EngineStats.snapshot()` at scrape time (a collector, so nothing is
counted twice); latency histograms are fed by the stats' request listener when a request finishes; request
outcomes (protocol, status, finish reason) are counted by the servers; start-up times by the launcher. Nothing
here reads engine internals.
"""
from __future__ import annotations

import dataclasses
import logging

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "jaxinfer_"
PHASES = ("loading", "warming_up", "serving", "draining", "stopped")
STARTUP_PHASES = ("loading", "compiling", "warmup")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "arrival to first generated token", buckets=_REQUEST, registry=r)
        self.inter_token_latency = Histogram(PREFIX + "inter_token_latency_seconds",
                                             "between consecutive steps that gave a request tokens",
                                             buckets=_LATENCY, registry=r)
        self.e2e_latency = Histogram(PREFIX + "e2e_request_latency_seconds", "arrival to finish",
                                     buckets=_REQUEST, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "arrival to the first step that ran it",
                                    buckets=_REQUEST, registry=r)
        self.outcomes = Counter(PREFIX + "request_outcomes", "requests answered, by protocol, status and the "
                                "first sample's finish reason (empty when it failed before generating)",
                                ["protocol", "status", "finish_reason"], registry=r)
        self.startup_seconds = Gauge(PREFIX + "startup_seconds", "time to ready, by phase",
                                     ["phase"], registry=r)
        self.phase = Enum(PREFIX + "server_phase", "the server's lifecycle phase", states=list(PHASES), registry=r)
        self._stats = None
        self._unsubscribe = None
        r.register(_EngineCollector(self))

    def bind(self, stats) -> None:
        """Read this engine's `EngineStats` from now on."""
        self.unbind()
        self._stats = stats
        self._unsubscribe = stats.add_request_listener(self._request_finished)

    def unbind(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._stats, self._unsubscribe = None, None

    def set_phase(self, phase: str) -> None:
        self.phase.state(phase)

    def record_outcome(self, protocol: str, status, finish_reason: str | None) -> None:
        self.outcomes.labels(protocol, str(status), finish_reason or "").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _request_finished(self, t) -> None:
        # Runs on the engine thread: it must never raise into the step loop.
        try:
            if t.time_to_first_token is not None:
                self.time_to_first_token.observe(t.time_to_first_token)
            if t.queue_time is not None:
                self.queue_time.observe(t.queue_time)
            if t.e2e_latency is not None:
                self.e2e_latency.observe(t.e2e_latency)
            for gap in t.inter_token_latencies:
                self.inter_token_latency.observe(gap)
        except Exception:  # noqa: BLE001
            logging.exception("metrics: request listener failed")


class _EngineCollector:
    """Engine counters and gauges, read from one stats snapshot per scrape."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def describe(self):
        return []  # unknown until bound; keeps registration from calling collect()

    def collect(self):
        stats = self._metrics._stats
        if stats is None:
            return
        s = stats.snapshot()

        def gauge(name, doc, value):
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("num_requests_running", "sequences holding KV blocks (n samples count n)", s.num_running)
        yield gauge("num_requests_waiting", "sequences queued, new or preempted", s.num_waiting)
        yield gauge("num_waiting_prompt_tokens", "prompt tokens of requests not yet scheduled",
                    s.num_waiting_prompt_tokens)
        yield gauge("kv_cache_usage_percent", "KV blocks referenced by live sequences, percent", 100.0 * s.kv_usage)
        yield gauge("kv_cache_blocks_used", "KV blocks referenced by live sequences", s.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV blocks in the pool", s.kv_blocks_total)
        yield gauge("prefix_cache_hit_rate", "prompt tokens served from cached blocks / looked up, since start",
                    s.prefix_cache_hit_rate)
        yield counter("prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                      s.prefix_cache_queried_tokens)
        yield counter("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                      s.prefix_cache_hit_tokens)
        yield counter("requests", "requests admitted by the engine", s.num_requests)
        yield counter("prompt_tokens", "prompt tokens admitted", s.num_prompt_tokens)
        yield counter("generation_tokens", "tokens generated and kept", s.num_generation_tokens)
        yield counter("num_preemptions", "sequences preempted (recomputed later)", s.num_preemptions)
        yield counter("engine_steps", "model steps", s.num_steps)
        yield counter("compilations_after_warmup", "step executables compiled after warm-up (should stay 0)",
                      s.num_compilations_after_warmup)
        startup = GaugeMetricFamily(PREFIX + "engine_startup_seconds", "the engine's own split of its start-up "
                                    "(stats.StartupTimes); executable figures grow while a background warm-up runs",
                                    labels=["phase"])
        for field in dataclasses.fields(s.startup):
            if field.name.endswith("_s"):
                startup.add_metric([field.name[:-2]], getattr(s.startup, field.name))
        yield startup
        yield gauge("executables_pending", "step executables a background warm-up has not made ready yet",
                    s.startup.num_executables_pending)
        finished = CounterMetricFamily(PREFIX + "finished_sequences", "finished samples by finish reason",
                                       labels=["finish_reason"])
        for reason, count in sorted(s.finished_by_reason.items()):
            finished.add_metric([reason], count)
        yield finished
