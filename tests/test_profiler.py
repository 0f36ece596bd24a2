"""The memory profiler on the shared small engine: its weight / KV split equals the arrays' known sizes, KV use
rises while requests run and returns to zero afterwards, and fragmentation is the unwritten tail of last blocks."""
from __future__ import annotations

import math

import jax

from jaxinfer.profiler import format_profile, profile_engine, random_requests
from tests.conftest import SMALL_ENGINE


def test_profile_splits_memory_and_kv_use_returns_to_zero(llm):
    engine = llm.engine
    c = engine.config
    requests = random_requests(c.vocab_size, 4, seed=1, input_range=(10, 14), output_range=(3, 10))
    prof = profile_engine(engine, requests, workspace=False)

    # weights: the sum of the parameter arrays' bytes; KV: 2 pages per layer of [KVH, blocks, 16, head_dim] f32
    assert prof.weights_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.runner.params))
    blocks, bs = SMALL_ENGINE["num_kv_blocks"], 16
    assert prof.kv_bytes == 2 * c.num_layers * c.num_kv_heads * blocks * bs * c.head_dim * 4
    assert prof.source == "live_arrays" and prof.total_blocks == blocks
    assert all(s.in_use_bytes >= prof.weights_bytes + prof.kv_bytes for s in prof.samples)

    # KV utilisation over time: every request's blocks are taken while it runs, none after
    lengths = [len(p) + sp.max_tokens for p, sp in requests]
    peak_used = max(s.used_blocks for s in prof.samples)
    assert 0 < peak_used <= sum(math.ceil(n / bs) for n in lengths)
    assert prof.samples[0].used_blocks == 0 and prof.samples[-1].used_blocks == 0
    assert prof.samples[-1].num_running == 0 and prof.samples[-1].kv_usage == 0
    # fragmentation: reserved-but-unwritten slots of last blocks, below one block per running sequence
    for s in prof.samples:
        assert 0 <= s.fragmentation < 1
        if s.used_blocks:
            assert s.fragmentation * s.used_blocks * bs <= s.num_running * (bs - 1) + 1e-9
    text = format_profile(prof)
    assert "0 used after the workload" in text


def test_step_workspace_is_xla_temporaries(llm):
    """XLA's buffer assignment of the largest step: positive, and far below the weights (the step reuses
    buffers layer after layer). The planner's estimate of it is of the same order."""
    from jaxinfer.planner.plan import activation_estimate
    from jaxinfer.profiler import step_workspace_bytes

    engine = llm.engine
    measured = step_workspace_bytes(engine.runner)
    estimate = activation_estimate(engine.config, 1, 4, SMALL_ENGINE["max_num_batched_tokens"],
                                   SMALL_ENGINE["max_num_seqs"], 16)
    assert 0 < measured < sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.runner.params)) / 10
    assert 0.25 < estimate / measured < 4
