"""The planner's per-device figures are what the engine places (8 virtual CPU devices): weights (plain, int8,
int4, tied over two stages) laid out by `ShardingPlan` as the loader does, and an engine's arrays at TP x PP, each
device's bytes measured on its shards against `jaxinfer plan`'s per-device weight and KV bytes for its stage."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.params import Kind, iter_leaves, model_specs, set_leaf
from jaxinfer.planner import PlanRequest, custom_accelerator, plan
from jaxinfer.quantization import quantize
from jaxinfer.sharding import ShardingPlan, make_mesh, per_device_bytes

CPU = custom_accelerator(24, 10, 0.094, platform="cpu", name="CPU")
# 6 query / 3 KV heads, vocab 250: uneven at TP 2 and 4 (zero query heads, replicated KV heads, padded vocab).
TINY = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=6, num_kv_heads=3,
            head_dim=16)


def _plan(config, tp, pp, bits, **kw):
    return plan(PlanRequest(model=config, gpu=CPU, weight_dtype=f"int{bits}" if bits else "float32",
                            dtype="float32", scale_dtype="float32", group_size=16, tp=tp, pp=pp, **kw))


@pytest.mark.parametrize("tp,pp,bits,tied", [(4, 1, 0, False), (2, 2, 8, False), (2, 3, 4, True), (8, 1, 0, True)])
def test_planner_weight_bytes_per_device_equal_the_placed_shards(tp, pp, bits, tied):
    config = ModelConfig(**TINY, tie_word_embeddings=tied)
    params = random_params(config, jnp.float32)
    for spec, w in list(iter_leaves(params, model_specs(config))):
        if bits and spec.kind == Kind.LINEAR:
            set_leaf(params, spec, quantize(w, bits=bits, group_size=16))
    layout = ShardingPlan(config, make_mesh(tp, pp))
    held = per_device_bytes(layout.shard_params(params))
    expected = _plan(config, tp, pp, bits, num_kv_blocks=8, block_size=4, max_model_len=32)
    per_stage = expected["weights"]["per_stage_device_bytes"]
    for stage in range(pp):
        row = [held[d] for d in layout.mesh.devices[stage]]
        assert row == [per_stage[stage]] * tp, (stage, row, per_stage)


def test_planner_and_profiler_equal_the_engine_arrays_at_tp2_pp2(tmp_path):
    """A whole engine on a (2, 2) mesh: every device's weights and KV pages, and the block count from the
    per-device budget, are the plan's; `jaxinfer profile` reports one device's share, and its KV use returns to
    zero after a workload."""
    import json

    from jaxinfer.engine import LLMEngine

    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=250, hidden_size=64, intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(hf))
    args = dict(weight_dtype="float32", dtype="float32", kv_cache_memory_gb=0.001, max_model_len=64)
    engine = LLMEngine(model=f"random:{path}", tensor_parallel_size=2, pipeline_parallel_size=2, verbose=False,
                       max_num_seqs=4, max_num_batched_tokens=32, **args)
    runner = engine.runner
    p = plan(PlanRequest(model=engine.config, gpu=CPU, tp=2, pp=2, **args))
    weights, kv = per_device_bytes(runner.params), per_device_bytes(runner.kv_cache)
    assert p["kv_cache"]["num_blocks"] == runner.num_blocks
    for stage in range(2):
        for d in runner.plan.mesh.devices[stage]:
            assert weights[d] == p["weights"]["per_stage_device_bytes"][stage]
            assert kv[d] == p["kv_cache"]["allocated_bytes_per_device"]
    from jaxinfer.profiler import profile_engine, random_requests

    prof = profile_engine(engine, random_requests(250, 3, seed=1, input_range=(5, 20), output_range=(2, 6)),
                          workspace=False)
    assert prof.weights_bytes == p["weights"]["per_device_bytes"]
    assert prof.kv_bytes == p["kv_cache"]["allocated_bytes_per_device"]
    assert prof.samples[-1].used_blocks == 0 and max(s.used_blocks for s in prof.samples) > 0
