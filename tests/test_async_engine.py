"""AsyncEngine: concurrent asyncio streams over one engine thread; bad input and disconnects stay isolated."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import wikitext_ids
from jaxinfer import SamplingParams
from jaxinfer.async_engine import AsyncEngine


@pytest.fixture
def async_engine(llm):
    engine = AsyncEngine(engine=llm.engine)
    yield engine
    engine.shutdown()


def _wait_until_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = engine.metrics()
        if m["used_blocks"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_concurrent_streams_match_offline_generate(llm, tokenizer):
    prompts = [wikitext_ids(tokenizer, 12 + 9 * i, offset=2000 + 97 * i) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    engine = AsyncEngine(engine=llm.engine)
    try:
        async def collect(prompt):
            tokens = []
            async for out in engine.generate(prompt, params):
                tokens += out.outputs[0].delta_token_ids
            return tokens

        async def main():
            return await asyncio.gather(*(collect(p) for p in prompts))

        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_bad_request_fails_alone_and_disconnect_frees_blocks(async_engine, tokenizer):
    good_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def good():
        return [out async for out in async_engine.generate(wikitext_ids(tokenizer, 20), good_params)][-1]

    async def bad():
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in async_engine.generate("", good_params):
                pass

    async def disconnect():
        stream = async_engine.generate(wikitext_ids(tokenizer, 30, offset=55),
                                       SamplingParams(max_tokens=300, ignore_eos=True))
        async for _ in stream:
            break  # client goes away after the first token
        await stream.aclose()

    async def main():
        return await asyncio.gather(good(), bad(), disconnect())

    final, _, _ = asyncio.run(main())
    assert final.finished and len(final.token_ids) == 8
    assert _wait_until_idle(async_engine)


def test_closed_event_loop_aborts_its_request_and_engine_keeps_serving(async_engine, tokenizer):
    """A caller whose event loop closes without closing its stream: the engine thread must not die delivering
    to it, and the request's blocks must be freed."""
    loop = asyncio.new_event_loop()
    stream = async_engine.generate(wikitext_ids(tokenizer, 30, offset=77), SamplingParams(max_tokens=300,
                                                                                         ignore_eos=True))
    loop.run_until_complete(stream.__anext__())
    loop.close()  # the stream is left suspended, its finally never runs
    assert _wait_until_idle(async_engine)
    assert async_engine._thread.is_alive()

    async def next_caller():
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        return [out async for out in async_engine.generate(wikitext_ids(tokenizer, 10), params)][-1]

    assert len(asyncio.run(next_caller()).token_ids) == 5
    # Close the abandoned stream ourselves (on a fresh loop): left to the garbage collector, its finalizer would
    # try to schedule aclose() on the closed loop and fail during some later test.
    asyncio.run(stream.aclose())
