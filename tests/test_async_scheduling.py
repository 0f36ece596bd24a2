"""Async scheduling (one step in flight) on the real default model: the same outputs as synchronous steps, the
next step really launched before the previous one's tokens are read, and no extra row or leaked block."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL_ENGINE, wikitext_ids
from jaxinfer import LLM, SamplingParams


@pytest.fixture(scope="module")
def sync_llm():
    return LLM("smollm2-135m", **{**SMALL_ENGINE, "async_scheduling": False})


def _mixed_workload(tokenizer):
    """Every way a sequence can stop or depend on its own tokens, in one busy batch that must preempt."""
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
            for q in ("What is the capital of France?", "Say hello.", "Name a fruit.")]
    long = [wikitext_ids(tokenizer, 150, offset=12000 + 300 * i) for i in range(5)]
    shared = wikitext_ids(tokenizer, 40, offset=500)
    prompts = long + chat + [shared + [11], shared + [12], wikitext_ids(tokenizer, 30, offset=900),
                             wikitext_ids(tokenizer, 25, offset=1300)]
    params = [
        *[SamplingParams(temperature=0.0, max_tokens=95 + i, ignore_eos=True) for i in range(5)],
        SamplingParams(temperature=0.0, max_tokens=40),  # stops on EOS
        SamplingParams(temperature=0.0, max_tokens=40, stop=["!"]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, n=2),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.5),
        SamplingParams(temperature=1.0, seed=3, max_tokens=25, ignore_eos=True, presence_penalty=0.7),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop_token_ids=[13]),
    ]
    return prompts, params


def test_async_and_sync_scheduling_give_the_same_outputs(llm, sync_llm, tokenizer):
    prompts, params = _mixed_workload(tokenizer)
    preemptions = llm.engine.metrics()["num_preemptions"]
    got = llm.generate(prompts, params)
    want = sync_llm.generate(prompts, params)
    assert llm.engine.metrics()["num_preemptions"] > preemptions  # the busy batch really preempted
    for g, w in zip(got, want):
        for go, wo in zip(g.outputs, w.outputs):
            assert go.token_ids == wo.token_ids
            assert (go.text, go.finish_reason, go.stop_reason) == (wo.text, wo.finish_reason, wo.stop_reason)
            if wo.logprobs is not None:
                assert [list(e) for e in go.logprobs] == [list(e) for e in wo.logprobs]
                np.testing.assert_allclose([v for e in go.logprobs for v in e.values()],
                                           [v for e in wo.logprobs for v in e.values()], atol=1e-4)
        if w.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(w.prompt_token_ids)
    assert {o.finish_reason for r in want for o in r.outputs} == {"stop", "length"}
    for engine in (llm.engine, sync_llm.engine):
        m = engine.metrics()
        assert m["used_blocks"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0


def _record_launches_and_fetches(runner, monkeypatch) -> list[tuple[str, object]]:
    # The handles themselves are kept (not their id()s): a freed handle's id can be reused by a later one, which
    # would mix up whose launch and fetch are whose.
    events: list[tuple[str, object]] = []
    launch, fetch = runner.launch, runner.fetch

    def recording_launch(*args, **kwargs):
        handle = launch(*args, **kwargs)
        events.append(("launch", handle))
        return handle

    def recording_fetch(handle):
        events.append(("fetch", handle))
        return fetch(handle)

    monkeypatch.setattr(runner, "launch", recording_launch)
    monkeypatch.setattr(runner, "fetch", recording_fetch)
    return events


def _launched_before_previous_was_read(events) -> list[bool]:
    """For each launch after the first: was it issued before the previous launch's results were fetched?"""
    handles = [h for kind, h in events if kind == "launch"]
    position = {(kind, id(h)): i for i, (kind, h) in enumerate(events)}  # every handle is alive: ids are unique
    return [position[("launch", id(nxt))] < position[("fetch", id(prev))] for prev, nxt in zip(handles, handles[1:])]


@pytest.mark.parametrize("penalty", [1.0, 1.3])  # penalties count the in-flight token on device
def test_next_step_launches_before_previous_tokens_are_read(llm, tokenizer, monkeypatch, penalty):
    events = _record_launches_and_fetches(llm.engine.runner, monkeypatch)
    out = llm.generate([wikitext_ids(tokenizer, 20, offset=4000)],
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=penalty))[0]
    assert len(out.token_ids) == 10
    overlapped = _launched_before_previous_was_read(events)
    assert len(overlapped) == 9  # one prefill and 9 decodes: no step for a token past max_tokens
    assert all(overlapped)


def test_abort_and_stop_with_a_step_in_flight_leave_no_blocks(llm, tokenizer):
    engine = llm.engine
    prompt = wikitext_ids(tokenizer, 30, offset=6000)
    alone = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    keep = engine.add_request(None, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                              prompt_token_ids=prompt)
    drop = engine.add_request(None, SamplingParams(max_tokens=100, ignore_eos=True),
                              prompt_token_ids=wikitext_ids(tokenizer, 50, offset=6500))
    stop = engine.add_request(None, SamplingParams(temperature=0.0, max_tokens=100, stop_token_ids=[alone[3]]),
                              prompt_token_ids=prompt)
    outputs = {}
    for _ in range(4):
        outputs.update((o.request_id, o) for o in engine.step())
    assert engine.core.step_in_flight  # the abort below lands while a step is on the device
    engine.abort_request(drop)
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs[keep].outputs[0].token_ids == alone
    assert outputs[stop].outputs[0].token_ids == alone[:alone.index(alone[3]) + 1] and outputs[stop].outputs[0].finish_reason == "stop"
    m = engine.metrics()
    assert m["used_blocks"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0
