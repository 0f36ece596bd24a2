"""The engine front end on a tiny random-weight Llama (fast to compile): stats against hand-counted values,
admission limits, the compile counter, and AsyncEngine's caller-side text work, abort and shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from jaxinfer import LLM, EngineClosedError, InvalidRequestError, QueueFullError, SamplingParams
from jaxinfer.async_engine import AsyncEngine

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_kv_blocks=32, verbose=False)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LLM(tiny_dir, **ENGINE)


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def _idle(engine) -> bool:
    s = engine.stats.snapshot()
    return s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0


def _settles_idle(engine, bound_s: float = 120.0) -> bool:
    """A stop string ends the stream on the caller's side before the engine thread applies the finish it sent,
    so right after such a stream the engine may still hold the sequence: wait (bounded) for it to let go."""
    deadline = time.monotonic() + bound_s
    while not _idle(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _idle(engine)


# ------------------------------------------------------------------------------------------------- stats

def test_stats_count_requests_tokens_and_finish_reasons(tiny):
    stats = tiny.engine.stats
    before = stats.snapshot()
    stats.pop_finished()
    lens, max_tokens = [5, 9, 17], [3, 6, 4]
    outs = tiny.generate([_ids(n, i) for i, n in enumerate(lens)],
                         [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens])
    after = stats.snapshot()
    assert after.num_requests - before.num_requests == 3
    assert after.num_prompt_tokens - before.num_prompt_tokens == 5 + 9 + 17
    assert after.num_generation_tokens - before.num_generation_tokens == 3 + 6 + 4
    assert after.num_finished_requests - before.num_finished_requests == 3
    assert after.finished_by_reason.get("length", 0) - before.finished_by_reason.get("length", 0) == 3
    assert after.num_steps > before.num_steps and after.num_running == 0 and after.kv_blocks_used == 0
    timings = {t.request_id: t for t in stats.pop_finished()}
    for out, n, m in zip(outs, lens, max_tokens):
        t = timings[out.request_id]
        assert (t.num_prompt_tokens, t.num_generation_tokens, len(t.token_times)) == (n, m, m)
        assert t.arrival_time <= t.scheduled_time <= t.first_token_time == t.token_times[0]
        assert t.token_times == sorted(t.token_times) and t.finished_time == t.token_times[-1]
        assert len(t.inter_token_latencies) == m - 1 and t.finish_reason == "length"
        assert t.first_token_time == out.metrics.first_token_time  # what the RequestOutput reports
        assert t.e2e_latency == pytest.approx(out.metrics.finished_time - out.metrics.arrival_time)

    # A stop string ends a request on the front end: only the tokens it kept are counted.
    prompt = _ids(12, 7)
    full = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    stop = full.text[8:12]
    before = stats.snapshot()
    cut = tiny.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    after = stats.snapshot()
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert len(cut.token_ids) < 30
    assert after.num_generation_tokens - before.num_generation_tokens == len(cut.token_ids)
    assert after.finished_by_reason["stop"] - before.finished_by_reason.get("stop", 0) == 1
    assert len(stats.request_timings(cut.request_id).token_times) == len(cut.token_ids)

    # An abort is counted as one.
    rid = tiny.engine.add_request(_ids(10, 8), SamplingParams(max_tokens=50, ignore_eos=True))
    tiny.engine.step()
    final = tiny.engine.abort_request(rid)
    assert final.finished and final.finish_reason == "abort"
    assert stats.snapshot().finished_by_reason["abort"] - after.finished_by_reason.get("abort", 0) == 1
    assert stats.request_timings(rid).finish_reason == "abort" and _idle(tiny.engine)


def test_gauges_follow_the_scheduler_block_by_block(tiny):
    """Hand-counted with block_size 16 and a 32-token step budget: step 1 prefills 32 of A's 40 tokens (2 blocks)
    while B waits; step 2 finishes A's prompt (3 blocks) and all of B's 20 tokens (2 blocks)."""
    engine = tiny.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    a = engine.add_request(_ids(40, 11), params)
    b = engine.add_request(_ids(20, 12), params)
    s = engine.stats.snapshot()
    assert (s.num_running, s.num_waiting, s.num_waiting_prompt_tokens, s.kv_blocks_used) == (0, 2, 60, 0)
    engine.step()
    s = engine.stats.snapshot()
    assert (s.num_running, s.num_waiting, s.num_waiting_prompt_tokens, s.kv_blocks_used) == (1, 1, 20, 2)
    engine.step()
    s = engine.stats.snapshot()
    assert (s.num_running, s.num_waiting, s.num_waiting_prompt_tokens, s.kv_blocks_used) == (2, 0, 0, 5)
    assert s.kv_blocks_total == 32 and s.kv_usage == 5 / 32
    timings = engine.stats.request_timings(b)
    assert timings.scheduled_time is not None and timings.queue_time >= 0
    engine.abort_request(a)
    engine.abort_request(b)
    assert _idle(engine)


def test_prefix_cache_counters(tiny):
    a = _ids(40, 21)
    before = tiny.engine.stats.snapshot()
    tiny.generate([a], SamplingParams(temperature=0.0, max_tokens=1))
    mid = tiny.engine.stats.snapshot()
    assert (mid.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens,
            mid.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens) == (40, 0)
    tiny.generate([a[:32] + _ids(5, 22)], SamplingParams(temperature=0.0, max_tokens=1))
    after = tiny.engine.stats.snapshot()  # A's two full blocks are served from the cache
    assert (after.prefix_cache_queried_tokens - mid.prefix_cache_queried_tokens,
            after.prefix_cache_hit_tokens - mid.prefix_cache_hit_tokens) == (37, 32)


def test_compilations_after_warmup_are_counted(tiny_dir):
    """Warm up only the 2-token bucket: a 10-token prompt then compiles the 16-token bucket's forward and
    sampler (exactly 2 executables), and nothing else does."""
    llm = LLM(tiny_dir, **ENGINE)
    llm.warmup(token_counts=[1])
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([[5]], greedy)
    assert llm.engine.stats.snapshot().num_compilations_after_warmup == 0
    llm.generate([_ids(10, 31)], greedy)
    assert llm.engine.stats.snapshot().num_compilations_after_warmup == 2
    llm.generate([_ids(10, 32)], greedy)
    assert llm.engine.stats.snapshot().num_compilations_after_warmup == 2


def test_admission_limits(tiny_dir):
    llm = LLM(tiny_dir, max_waiting_requests=3, max_waiting_prompt_tokens=50, **ENGINE)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request(_ids(20, 41), params)
    engine.add_request(_ids(25, 42), params)  # 45 waiting prompt tokens: fits 50
    with pytest.raises(QueueFullError, match="max_waiting_prompt_tokens=50") as e:
        engine.add_request(_ids(10, 43), params)  # 55 would not
    assert e.value.limit == "max_waiting_prompt_tokens"
    engine.add_request(_ids(1, 44), params)  # 46: fits
    with pytest.raises(QueueFullError, match="max_waiting_requests=3") as e:
        engine.add_request(_ids(1, 47), params)  # fits the tokens, not the request count
    assert e.value.limit == "max_waiting_requests"
    s = engine.stats.snapshot()
    assert (s.num_requests, s.num_waiting, s.num_waiting_prompt_tokens) == (3, 3, 46)  # the refused left no trace
    engine.step()  # the first two are scheduled (20 + 12 of 25 tokens), the third waits
    assert engine.stats.snapshot().num_waiting_prompt_tokens == 1
    engine.step()
    assert engine.stats.snapshot().num_waiting_prompt_tokens == 0
    engine.add_request(_ids(60, 45), params)  # longer than the limit, but nothing waits: admitted
    with pytest.raises(QueueFullError):
        engine.add_request(_ids(5, 46), params)
    while engine.has_unfinished_requests():
        engine.step()
    assert _idle(engine)


# ------------------------------------------------------------------------------------------- AsyncEngine

def _collect(engine, prompt, params, **kwargs):
    async def run():
        return [out async for out in engine.generate(prompt, params, **kwargs)]
    return asyncio.run(run())


@pytest.fixture
def async_tiny(tiny):
    engine = AsyncEngine(engine=tiny.engine)
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()


def test_async_text_chat_and_stop_strings_match_offline(tiny):
    # The offline references run first: while an AsyncEngine's thread owns the core, nothing else may step it.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    offline = tiny.generate(["Once upon a time"], params)[0]
    messages = [{"role": "user", "content": "Name a colour."}]
    offline_chat = tiny.chat(messages, params)[0]
    # n = 2, seeded: a stop string found on the caller's side ends only the sample that contains it.
    sampled = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    full = tiny.generate([_ids(8, 51)], sampled)[0]
    stop = full.outputs[0].text[6:10]

    engine = AsyncEngine(engine=tiny.engine)
    try:
        streamed = _collect(engine, "Once upon a time", params)
        assert streamed[-1].finished and streamed[-1].text == offline.text
        assert [t for o in streamed for t in o.outputs[0].delta_token_ids] == offline.token_ids
        assert "".join(o.outputs[0].delta_text for o in streamed) == offline.text
        assert _collect(engine, messages, params)[-1].token_ids == offline_chat.token_ids
        got = _collect(engine, _ids(8, 51), SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=24,
                                                           ignore_eos=True, stop=[stop]))[-1]
        assert _settles_idle(engine.engine)
    finally:
        engine.shutdown()
    for g, f in zip(got.outputs, full.outputs):
        if stop in f.text:
            assert (g.text, g.finish_reason, g.stop_reason) == (f.text[:f.text.index(stop)], "stop", stop)
        else:
            assert (g.text, g.finish_reason) == (f.text, "length")


_HANG = 600  # seconds


class _StepGate:
    """Holds the engine thread inside its `pause_at`-th step from now (a stats step listener) until released, so
    a test can queue commands while the engine is known to be mid-request. The waits are bounded only to turn a
    hang into a failure: generous, since a busy machine may spend minutes compiling a step."""

    def __init__(self, stats, pause_at: int):
        self.paused, self.release = threading.Event(), threading.Event()
        self._target = stats.num_steps + pause_at
        self._stats = stats
        self.unsubscribe = stats.add_step_listener(self._on_step)

    def _on_step(self, _record) -> None:
        if self._stats.num_steps == self._target:
            self.paused.set()
            self.release.wait(_HANG)

    async def wait_paused(self) -> None:
        assert await asyncio.get_running_loop().run_in_executor(None, self.paused.wait, _HANG)


def test_abort_ends_the_stream_and_frees_blocks(async_tiny):
    gate = _StepGate(async_tiny.stats, pause_at=3)

    async def main():
        stream = async_tiny.generate(_ids(20, 61), SamplingParams(max_tokens=100, ignore_eos=True),
                                     request_id="victim")
        first = await stream.__anext__()
        await gate.wait_paused()  # the request is mid-generation and cannot finish before the abort lands
        await async_tiny.abort("victim")
        gate.release.set()
        rest = [out async for out in stream]
        return first, rest

    try:
        first, rest = asyncio.run(main())
    finally:
        gate.release.set()
        gate.unsubscribe()
    final = rest[-1]
    assert final.finished and final.finish_reason == "abort" and not first.finished
    assert 0 < len(final.token_ids) < 100
    assert async_tiny.stats.request_timings("victim").finish_reason == "abort"
    assert _idle(async_tiny.engine)  # freed by the time the stream ended
    asyncio.run(async_tiny.abort("no-such-request"))  # unknown ids are ignored


def test_admission_errors_reach_only_their_caller(tiny_dir):
    llm = LLM(tiny_dir, max_waiting_prompt_tokens=50, **ENGINE)
    engine = AsyncEngine(engine=llm.engine)
    gate = _StepGate(engine.stats, pause_at=2)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def main():
        running = engine.generate(_ids(10, 71), params)
        await running.__anext__()
        await gate.wait_paused()
        # Both adds are queued while the engine is inside a step, so it applies them together: 30 waiting prompt
        # tokens, then 30 more would exceed 50.
        b = asyncio.ensure_future(_drain(engine.generate(_ids(30, 72), params)))
        c = asyncio.ensure_future(_drain(engine.generate(_ids(30, 73), params)))
        await asyncio.sleep(0)  # let both register their requests
        await asyncio.sleep(0)
        gate.release.set()
        rest = await _drain(running)
        return rest, await asyncio.gather(b, c, return_exceptions=True)

    try:
        rest, (b, c) = asyncio.run(main())
        assert rest[-1].finished and len(rest[-1].token_ids) == 6
        assert b[-1].finished and len(b[-1].token_ids) == 6
        assert isinstance(c, QueueFullError) and c.limit == "max_waiting_prompt_tokens"
        with pytest.raises(InvalidRequestError) as e:
            _collect(engine, "", params)
        assert e.value.field == "prompt"
        assert _idle(llm.engine)
    finally:
        gate.release.set()
        gate.unsubscribe()
        engine.shutdown()


async def _drain(stream):
    return [out async for out in stream]


def test_shutdown_ends_open_streams(tiny):
    engine = AsyncEngine(engine=tiny.engine)
    loop = asyncio.new_event_loop()
    try:
        stream = engine.generate(_ids(10, 81), SamplingParams(max_tokens=120, ignore_eos=True))
        loop.run_until_complete(stream.__anext__())
        engine.shutdown()
        with pytest.raises(EngineClosedError):
            loop.run_until_complete(_drain(stream))
        with pytest.raises(EngineClosedError):
            loop.run_until_complete(_drain(engine.generate("hello", SamplingParams(max_tokens=2))))
    finally:
        loop.close()
    assert _idle(tiny.engine)  # the open request was aborted
