"""Engine behaviour on the real default model: batch invariance, seeds, no recompilation, prefix caching,
preemption, stop conditions, logprobs (vs HF), aborts and bad input — and no KV block ever leaks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import wikitext_ids
from jaxinfer import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _pool_is_full(llm) -> bool:
    m = llm.engine.metrics()
    return m["used_blocks"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0


def _busy_batch(tokenizer, n=7):
    """Other requests with varied lengths and random sampling, so the batch mixes prefill chunks and decodes."""
    prompts = [wikitext_ids(tokenizer, 20 + 23 * i, offset=1000 + 300 * i) for i in range(n)]
    params = [SamplingParams(temperature=0.9, max_tokens=20 + 7 * i, ignore_eos=True, seed=i) for i in range(n)]
    return prompts, params


def test_greedy_is_batch_invariant(llm, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}])
    alone = llm.generate([prompt], GREEDY)[0].token_ids
    others, params = _busy_batch(tokenizer)
    outs = llm.generate(others[:3] + [prompt] + others[3:], params[:3] + [GREEDY] + params[3:])
    assert outs[3].token_ids == alone
    assert _pool_is_full(llm)


def test_fixed_seed_is_batch_invariant(llm, tokenizer):
    prompt = wikitext_ids(tokenizer, 40, offset=77)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompt], p)[0].token_ids
    others, params = _busy_batch(tokenizer, 5)
    outs = llm.generate([others[0], prompt] + others[1:], [params[0], p] + params[1:])
    assert outs[1].token_ids == alone
    different_seed = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20,
                                                           ignore_eos=True))[0].token_ids
    assert different_seed != alone  # the seed really drives the sample


def test_no_recompilation_after_warmup(llm, tokenizer):
    llm.warmup()
    compiled = llm.engine.runner.num_compiled()
    rng = np.random.default_rng(0)
    prompts = [wikitext_ids(tokenizer, int(rng.integers(1, 200)), offset=int(rng.integers(0, 5000)))
               for _ in range(20)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 40)),
                             ignore_eos=True, seed=i) for i in range(20)]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert llm.engine.runner.num_compiled() == compiled
    assert _pool_is_full(llm)


def test_prefix_caching_reuses_blocks_and_keeps_outputs(llm, tokenizer):
    shared = wikitext_ids(tokenizer, 80, offset=3000)
    a, b = shared + wikitext_ids(tokenizer, 10, offset=50), shared + wikitext_ids(tokenizer, 12, offset=90)
    first = llm.generate([a], GREEDY)[0].token_ids
    hits_before = llm.engine.metrics()["prefix_cache_hit_rate"]
    outs = llm.generate([b, a], GREEDY)
    assert outs[1].token_ids == first  # served from cached blocks, same tokens
    assert llm.engine.metrics()["prefix_cache_hit_rate"] > hits_before
    assert _pool_is_full(llm)


def test_preemption_under_tiny_pool_keeps_greedy_outputs(llm, tokenizer):
    """8 long requests need ~100 blocks; the pool has 64, so the scheduler must preempt and recompute."""
    prompts = [wikitext_ids(tokenizer, 100, offset=7000 + 211 * i) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    together = llm.generate(prompts, params)
    assert llm.engine.metrics()["num_preemptions"] > 0
    alone = [llm.generate([p], params)[0].token_ids for p in prompts[:2]]
    assert [o.token_ids for o in together[:2]] == alone
    assert _pool_is_full(llm)


def test_stop_conditions(llm, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60))[0]
    assert full.finish_reason in ("stop", "length")
    stop_str = full.text[10:14]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60, stop=[stop_str]))[0]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop_str
    assert cut.text == full.text[:full.text.index(stop_str)]
    token = full.token_ids[5]
    by_id = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60, stop_token_ids=[token]))[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    capped = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=7))[0]
    assert capped.finish_reason == "length" and capped.token_ids == full.token_ids[:7]
    eos = tokenizer.eos_token_ids
    assert full.finish_reason == "length" or full.token_ids[-1] in eos


def test_logprobs_match_hf(llm, tokenizer, hf_model):
    prompt = wikitext_ids(tokenizer, 30, offset=123)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5, prompt_logprobs=3))[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + out.token_ids[:2]])).logits[0]
    ref = torch.log_softmax(logits, -1).numpy()
    for i, entry in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert len(entry) == 5
        top5 = np.argsort(-row)[:5]
        assert set(entry) == set(top5.tolist())
        for t, lp in entry.items():
            assert abs(lp - row[t]) < 2e-3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(entry[prompt[i]] - ref[i - 1][prompt[i]]) < 2e-3


def test_prompt_logprobs_complete_despite_prefix_cache_and_preemption(llm, tokenizer, hf_model):
    """The prompt's blocks are in the prefix cache and the pool is too small for the batch: every prompt position
    still gets exactly one entry, equal to HF's."""
    prompt = wikitext_ids(tokenizer, 60, offset=900)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))  # caches the prompt's full blocks
    preemptions = llm.engine.metrics()["num_preemptions"]
    others = [wikitext_ids(tokenizer, 100, offset=7000 + 211 * i) for i in range(7)]
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)] * 7 + [
        SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, prompt_logprobs=1)]
    out = llm.generate(others + [prompt], params)[-1]
    assert llm.engine.metrics()["num_preemptions"] > preemptions
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0], -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(entry[prompt[i]] - ref[i - 1][prompt[i]]) < 2e-3
    assert _pool_is_full(llm)


def test_n_samples_share_prompt_and_differ(llm, tokenizer):
    prompt = wikitext_ids(tokenizer, 50, offset=400)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert _pool_is_full(llm)


def test_bad_input_is_rejected_and_others_finish(llm, tokenizer):
    engine = llm.engine
    good = engine.add_request(None, GREEDY, prompt_token_ids=wikitext_ids(tokenizer, 20))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("", GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(None, GREEDY, prompt_token_ids=[5] * 600)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hello", GREEDY, request_id=good)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == [good] and len(finished[good].token_ids) == GREEDY.max_tokens or \
        finished[good].finish_reason == "stop"
    assert _pool_is_full(llm)


def test_abort_frees_blocks_at_once(llm, tokenizer):
    engine = llm.engine
    ids = [engine.add_request(None, SamplingParams(max_tokens=200, ignore_eos=True),
                              prompt_token_ids=wikitext_ids(tokenizer, 60, offset=100 * i)) for i in range(3)]
    for _ in range(6):
        engine.step()
    used = engine.metrics()["used_blocks"]
    engine.abort_request(ids[0])
    assert engine.metrics()["used_blocks"] < used
    for rid in ids[1:]:
        engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert _pool_is_full(llm)


def test_stream_yields_deltas_and_abandoned_stream_frees_blocks(llm):
    pieces = []
    for out in llm.stream("The history of the Roman Empire", SamplingParams(temperature=0.0, max_tokens=16)):
        pieces.append(out.outputs[0].delta_text)
    assert "".join(pieces) == out.text and out.finished
    stream = llm.stream("Tell me a story", SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()  # consumer walks away
    assert _pool_is_full(llm)


def test_static_policy_gives_the_same_greedy_tokens(llm, tokenizer):
    """The benchmark's static-batching baseline computes the same tokens, with padded rows as batches drain."""
    from jaxinfer import LLM
    from conftest import SMALL_ENGINE

    static = LLM("smollm2-135m", scheduler_policy="static", **SMALL_ENGINE)
    prompts = [wikitext_ids(tokenizer, 15 + 11 * i, offset=9000 + 131 * i) for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 5 * i, ignore_eos=True) for i in range(10)]
    assert [o.token_ids for o in static.generate(prompts, params)] == \
        [o.token_ids for o in llm.generate(prompts, params)]
    assert static.engine.metrics()["used_blocks"] == 0
