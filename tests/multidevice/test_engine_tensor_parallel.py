"""The engine tests' scenarios on a sharded model: continuous batching (batch invariance), no recompilation
after warm-up, prefix caching, preemption and async scheduling (launch before read, aborts and stops with a step
in flight), at tensor_parallel_size=2 (SmolLM2's real weights, its first layers, loaded from an orbax checkpoint
straight into the shards: 3 KV heads over 2 devices, so KV head 0 is replicated). The block pool and scheduler
are the unsharded engine's. Plus: the sharded engine's outputs equal the one-device engine's."""
from __future__ import annotations

import pytest

from conftest import SMALL_ENGINE, wikitext_ids
from jaxinfer import LLM, SamplingParams
from parallel_fixtures import SMOLLM_LAYERS
from test_async_scheduling import (test_abort_and_stop_with_a_step_in_flight_leave_no_blocks,  # noqa: F401
                                   test_next_step_launches_before_previous_tokens_are_read)
from test_engine import (test_greedy_is_batch_invariant, test_no_recompilation_after_warmup,  # noqa: F401
                         test_preemption_under_tiny_pool_keeps_greedy_outputs,
                         test_prefix_caching_reuses_blocks_and_keeps_outputs)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, smollm_truncated, gguf_path):
    from jaxinfer.loaders.checkpoint import save_checkpoint
    from jaxinfer.tokenizer import load_tokenizer

    path = save_checkpoint(str(tmp_path_factory.mktemp(f"smollm2-{SMOLLM_LAYERS}-layers")), *smollm_truncated)
    load_tokenizer(gguf_path).hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    """Overrides conftest's one-device engine for the imported engine tests."""
    engine = LLM(checkpoint_dir, tensor_parallel_size=2, **SMALL_ENGINE)
    assert engine.engine.runner.plan.tp == 2 and not engine.engine.runner.plan.heads.is_identity
    return engine


def test_sharded_engine_gives_the_one_device_engines_outputs(llm, checkpoint_dir, tokenizer):
    prompts = [wikitext_ids(tokenizer, 20 + 9 * i, offset=2000 + 250 * i) for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=12 + 3 * i, ignore_eos=True) for i in range(6)]
    sharded = llm.generate(prompts, params)
    one_device = LLM(checkpoint_dir, **SMALL_ENGINE).generate(prompts, params)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in one_device]


def test_kv_budget_is_per_device(checkpoint_dir):
    """kv_cache_memory_gb is each device's budget: at TP=2 a block costs 2 of SmolLM2's 3 KV heads per device, so
    the pool holds 1.5x the blocks one device would, and no device holds more KV than its budget."""
    from jaxinfer.sharding import per_device_bytes

    budget = 0.01
    engine = LLM(checkpoint_dir, tensor_parallel_size=2, **{**SMALL_ENGINE, "num_kv_blocks": None,
                                                             "kv_cache_memory_gb": budget}).engine
    runner = engine.runner
    c = engine.config
    per_block = 2 * c.num_layers * 2 * c.head_dim * runner.block_size * 4  # K and V, 2 KV slots, f32
    assert runner.num_blocks == int(budget * 2**30 // per_block)
    held = per_device_bytes(runner.kv_cache)
    assert list(held.values()) == [runner.num_blocks * per_block] * 2
    assert max(held.values()) <= budget * 2**30
