"""Layout logic of tensor / pipeline parallelism that needs no devices: the head layout keeps attention exact
(checked against plain GQA attention in numpy), layer stages, and the pipeline's micro-batch bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxinfer.batch import SeqChunk
from jaxinfer.config import load_preset
from jaxinfer.params import model_specs
from jaxinfer.pipeline import build_pipeline_batch, split_microbatches
from jaxinfer.sharding import (PIPE, TENSOR, ShardingError, ShardingPlan, _expand, _remap, head_layout, make_mesh,
                               stage_layers)


@settings(max_examples=200, deadline=None)
@given(kv_heads=st.integers(1, 12), group=st.integers(1, 8), tp=st.integers(1, 16))
def test_head_layout_places_every_query_head_with_its_kv_head(kv_heads, group, tp):
    layout = head_layout(kv_heads * group, kv_heads, tp)
    slots = len(layout.kv_src)
    assert slots % tp == 0 and len(layout.q_src) == slots * layout.group
    assert sorted(h for h in layout.q_src if h >= 0) == list(range(kv_heads * group))  # each exactly once
    assert set(layout.kv_src) == set(range(kv_heads))
    for i, h in enumerate(layout.q_src):
        if h >= 0:
            assert layout.kv_src[i // layout.group] == h // group  # still attends to its own KV head
    assert layout.is_identity == (kv_heads % tp == 0)
    assert slots // tp == -(-kv_heads // tp)  # as few KV slots per shard as the split allows


def _attention(x, wq, wk, wv, wo, heads, kv_heads, hd):
    """Plain GQA self-attention (no mask) of x [T, D] in numpy: the oracle."""
    t = x.shape[0]
    q = (x @ wq).reshape(t, heads, hd)
    k, v = (x @ wk).reshape(t, kv_heads, hd), (x @ wv).reshape(t, kv_heads, hd)
    g = heads // kv_heads
    s = np.einsum("thd,shd->hts", q, np.repeat(k, g, axis=1)) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, np.repeat(v, g, axis=1)).reshape(t, heads * hd) @ wo


@pytest.mark.parametrize("heads,kv_heads,tp", [(9, 3, 2), (9, 3, 4), (9, 3, 8), (32, 8, 16), (6, 2, 4)])
def test_padded_and_replicated_heads_give_the_same_attention(heads, kv_heads, tp):
    """Lay out the projections as the sharded model stores them, run each shard's heads alone and add the
    shards' o-projection outputs (the all-reduce): equal to the unsharded attention."""
    rng = np.random.default_rng(0)
    d, hd, t = 16, 4, 5
    x = rng.standard_normal((t, d))
    wq, wo = rng.standard_normal((d, heads * hd)), rng.standard_normal((heads * hd, d))
    wk, wv = rng.standard_normal((d, kv_heads * hd)), rng.standard_normal((d, kv_heads * hd))
    layout = head_layout(heads, kv_heads, tp)
    q_index, kv_index = _expand(layout.q_src, hd), _expand(layout.kv_src, hd)
    wq_s, wo_s = _remap(wq, q_index, 1), _remap(wo, q_index, 0)
    wk_s, wv_s = _remap(wk, kv_index, 1), _remap(wv, kv_index, 1)
    q_per, kv_per = wq_s.shape[1] // tp, wk_s.shape[1] // tp
    total = sum(_attention(x, wq_s[:, i * q_per:(i + 1) * q_per], wk_s[:, i * kv_per:(i + 1) * kv_per],
                           wv_s[:, i * kv_per:(i + 1) * kv_per], wo_s[i * q_per:(i + 1) * q_per],
                           q_per // hd, kv_per // hd, hd) for i in range(tp))
    np.testing.assert_allclose(total, _attention(x, wq, wk, wv, wo, heads, kv_heads, hd), rtol=1e-10, atol=1e-10)


MEGATRON = {  # the layout by hand: column-parallel q/k/v/gate/up, row-parallel o/down, vocab over every device
    "embed": P((PIPE, TENSOR), None), "lm_head": P(None, (PIPE, TENSOR)), "final_norm": P(None),
    "attn_norm": P(None), "mlp_norm": P(None), "wq": P(None, TENSOR), "wk": P(None, TENSOR), "wv": P(None, TENSOR),
    "wo": P(TENSOR, None), "w_gate": P(None, TENSOR), "w_up": P(None, TENSOR), "w_down": P(TENSOR, None)}


def test_rules_give_every_parameter_its_megatron_spec():
    config = load_preset("llama-3.1-8b")
    plan = ShardingPlan(config, AbstractMesh((2, 8), (PIPE, TENSOR)))
    for spec in model_specs(config):
        assert plan.partition_spec(spec) == MEGATRON[spec.name], spec.key
        layer = spec.path[0].startswith("layers_")
        assert plan.stored_spec(spec) == (P(PIPE, *MEGATRON[spec.name]) if layer else MEGATRON[spec.name])
    assert plan.kv_partition_spec() == P(PIPE, TENSOR, None, None, None)
    assert (plan.local_config.num_heads, plan.local_config.num_kv_heads, plan.local_config.num_layers) == (4, 1, 16)


def test_llama3_70b_at_tp16_replicates_each_kv_head_on_two_shards():
    plan = ShardingPlan(load_preset("llama-3.1-70b"), AbstractMesh((1, 16), (PIPE, TENSOR)))
    assert plan.heads.kv_src == tuple(h for h in range(8) for _ in range(2))
    assert plan.heads.q_src == tuple(range(64))  # no zero heads: 4 query heads per shard, with their KV head
    assert (plan.local_config.num_heads, plan.local_config.num_kv_heads) == (4, 1)


def test_stage_layers_are_contiguous_and_balanced():
    assert stage_layers(30, 4) == (range(0, 8), range(8, 16), range(16, 23), range(23, 30))
    assert stage_layers(4, 2) == (range(0, 2), range(2, 4))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=0, max_size=10), m=st.integers(1, 4))
def test_pipeline_batch_keeps_chunk_order(lengths, m):
    """Micro-batches are contiguous runs of chunks; the index maps send every chunk's rows and tokens back to
    chunk order, which is what the sampler and the engine read."""
    rng = np.random.default_rng(len(lengths) * 7 + m)
    chunks = [SeqChunk(rng.integers(1, 100, n).tolist(), int(rng.integers(0, 5)), list(range(4 * i, 4 * i + 4)))
              for i, n in enumerate(lengths)]
    groups = split_microbatches(chunks, m)
    assert len(groups) == m and [c for g in groups for c in g] == chunks
    assert all(groups[i] or not groups[i + 1] for i in range(m - 1))  # empty micro-batches only at the end
    batch = build_pipeline_batch(chunks, num_microbatches=m, buckets=(2, 4, 8, 16, 32, 64, 128, 256),
                                 max_num_seqs=16, max_blocks=4, block_size=8, num_blocks=64)
    flat_tokens = batch.mb.token_ids.reshape(-1)
    every = [t for c in chunks for t in c.token_ids]
    np.testing.assert_array_equal(flat_tokens[batch.token_index[:len(every)]], every)
    np.testing.assert_array_equal(batch.logits_indices[:len(chunks)], np.cumsum(lengths) - 1 if lengths else [])
    s = batch.mb.logits_indices.shape[1]
    for i, c in enumerate(chunks):  # row i's last token, in its micro-batch, is the chunk's last token
        mb, row = divmod(int(batch.row_index[i]), s)
        assert batch.mb.token_ids[mb][batch.mb.logits_indices[mb][row]] == c.token_ids[-1]
    assert int(batch.num_microbatches[0]) == sum(1 for g in groups if g)


def test_mesh_larger_than_the_machine_is_refused_with_a_hint():
    with pytest.raises(ShardingError, match="needs 2 devices, found 1.*xla_force_host_platform_device_count"):
        make_mesh(2, 1)
