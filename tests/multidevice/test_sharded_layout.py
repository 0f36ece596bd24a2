"""What sharding puts where and what the compiled step communicates (8 virtual CPU devices): per-device weight
and KV bytes measured on the sharded arrays, the collectives in the HLO of a TP=4 step, a PP=2 step and the
sampler, and clear refusals for quantized layouts that cannot be split."""
from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import SamplingParams, sampler
from jaxinfer.batch import SeqChunk
from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.model import init_kv_cache
from jaxinfer.model_runner import ModelRunner
from jaxinfer.params import Kind, model_specs, set_leaf, iter_leaves
from jaxinfer.quantization import QuantizedWeight, quantize
from jaxinfer.sharding import ShardingError, ShardingPlan, make_mesh, per_device_bytes
from parallel_fixtures import RUNNER_ARGS, on_host

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def _norm_bytes(config, params) -> int:
    return sum(np.asarray(v).nbytes for s, v in iter_leaves(params, model_specs(config)) if s.kind == Kind.NORM)


@pytest.mark.parametrize("tp,pp", [(4, 1), (1, 2), (2, 4)])
def test_weight_and_kv_bytes_per_device_are_one_over_the_degree(llama_layout, tp, pp):
    """Llama-3-8B's layout splits evenly: each device holds 1/(TP*PP) of the weights and of the KV pages. By
    design replicated: the RMSNorm scales (over the tensor axis) and the vocabulary's padding to a multiple of
    the device count (1001 -> 1008 rows)."""
    config, params = llama_layout
    plan = ShardingPlan(config, make_mesh(tp, pp))
    sharded = plan.shard_params(params)
    n = tp * pp
    weights = per_device_bytes(sharded)
    assert len(weights) == n
    for held in weights.values():
        assert abs(held - _nbytes(params) / n) <= 0.05 * _nbytes(params) / n
    norms_per_device = _norm_bytes(config, params) / pp  # each stage keeps its layers' norms on all its devices
    assert max(weights.values()) - min(weights.values()) <= norms_per_device
    kv = per_device_bytes(plan.init_kv_cache(16, 8, jnp.float32, keys_transposed=True))
    whole = _nbytes(init_kv_cache(config, 16, 8, jnp.float32, "xla"))
    assert set(kv.values()) == {whole // n}


def test_replicated_kv_heads_cost_what_the_layout_says(smollm_truncated):
    """SmolLM2 at TP=2: 3 KV heads over 4 slots (head 0 on both shards), so each device holds 2/3 of the KV
    pages, not 1/2; query heads are padded 9 -> 12, so q/o projections are 6/9 per device. At TP=3 all is 1/3."""
    config, params = smollm_truncated
    whole = _nbytes(init_kv_cache(config, 16, 8, jnp.float32, "xla"))
    for tp, kv_share, q_share in ((2, 2 / 3, 6 / 9), (3, 1 / 3, 1 / 3)):
        plan = ShardingPlan(config, make_mesh(tp, 1))
        kv = per_device_bytes(plan.init_kv_cache(16, 8, jnp.float32, keys_transposed=True))
        assert set(kv.values()) == {round(whole * kv_share)}
        sharded = plan.shard_params({"layers_0": params["layers_0"]} | {k: params[k] for k in ("lm_head",
                                                                                             "final_norm")})
        wq = per_device_bytes(sharded["layers_0"]["wq"])
        assert set(wq.values()) == {round(np.asarray(params["layers_0"]["wq"]).nbytes * q_share)}


def _collectives(hlo: str) -> dict[str, int]:
    counts = Counter({op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES})
    return {op: n for op, n in counts.items() if n}


def _runner(config, params, tp, pp):
    plan = ShardingPlan(config, make_mesh(tp, pp))
    return ModelRunner(config, plan.shard_params(params), plan=plan, **RUNNER_ARGS)


def _compiled_forward(runner) -> str:
    batch = runner.prepare([SeqChunk([1, 2, 3], 0, [0])])
    return runner._forward.lower(runner.params, runner.kv_cache, batch, None,
                                 runner._no_prev_tokens).compile().as_text()


def _compiled_sampler(runner, params: SamplingParams) -> str:
    rows = [sampler.RowInfo(params=params, seed=0, step=0, prompt_token_ids=[1], output_token_ids=[])]
    tensors, flags = sampler.make_sampling_tensors(rows, 4, runner.config.vocab_size)
    logits = jax.ShapeDtypeStruct((4, runner.plan.padded_vocab), jnp.float32,
                                  sharding=jax.sharding.NamedSharding(runner.plan.mesh,
                                                                      jax.sharding.PartitionSpec(None,
                                                                                                 runner.vocab.axes)))
    return runner._sample.lower(logits, tensors, runner._no_prev_tokens, flags=flags,
                                eos_token_ids=(0,)).compile().as_text()


def test_tensor_parallel_step_has_one_all_reduce_per_block_and_nothing_else(llama_layout):
    """TP=4, 4 layers: one all-reduce after each attention and each MLP (Megatron), one for the vocab-parallel
    embedding; the logits stay split over the vocabulary (no gather)."""
    config, params = llama_layout
    assert _collectives(_compiled_forward(_runner(config, params, 4, 1))) == {"all-reduce": 2 * config.num_layers
                                                                              + 1}


def test_sampler_on_split_logits_never_gathers_the_vocabulary(smollm_truncated):
    """SmolLM2's 49152-token vocabulary over TP=4. Greedy: a max and a min-index all-reduce of [S] values.
    Random top-k / top-p: gathers of each shard's candidates ([S, 4 x 256]) and block masses ([S, V / 128]),
    never a vocabulary row."""
    config, params = smollm_truncated
    runner = _runner(config, params, 4, 1)
    assert _collectives(_compiled_sampler(runner, SamplingParams(temperature=0.0))) == {"all-reduce": 2}
    hlo = _compiled_sampler(runner, SamplingParams(temperature=0.8, top_p=0.9, top_k=40))
    gathers = re.findall(r"= (.+?) all-gather(?:-start)?\(", hlo)
    widths = [int(w) for shape in gathers for w in re.findall(r"\[\d+,(\d+)\]", shape)]
    assert gathers and max(widths) <= config.vocab_size // 32, gathers


def test_pipeline_step_passes_activations_point_to_point(llama_layout):
    """PP=2: one collective-permute (stage to stage, inside the tick loop), the embedding's all-reduce over the
    vocabulary split and one all-reduce handing the last stage's rows to every device for the LM head. With TP=2
    inside each stage, also the two all-reduces per layer of the stage (the loop body holds the stage's layers
    once)."""
    config, params = llama_layout
    assert _collectives(_compiled_forward(_runner(config, params, 1, 2))) == {"collective-permute": 1,
                                                                             "all-reduce": 2}
    layers_per_stage = config.num_layers // 2
    assert _collectives(_compiled_forward(_runner(config, params, 2, 2))) == {
        "collective-permute": 1, "all-reduce": 2 + 2 * layers_per_stage}


def test_block_copies_stay_local_and_copy_every_layer(llama_layout):
    """Copy-on-write on stacked, sharded pages ([pipe, kv slots, blocks, ...]): no communication, and exactly the
    requested blocks change, in every layer of every stage (checked against numpy)."""
    config, params = llama_layout
    runner = _runner(config, params, 2, 2)
    src = dst = np.zeros(2, np.int32)
    assert _collectives(runner._copy.lower(runner.kv_cache, src, dst).compile().as_text()) == {}
    rng = np.random.default_rng(0)
    sharding = jax.sharding.NamedSharding(runner.plan.mesh, runner.plan.kv_partition_spec())
    before = [tuple(rng.standard_normal(a.shape).astype(np.float32) for a in pair) for pair in runner.kv_cache]
    runner.kv_cache = tuple(tuple(jax.device_put(a, sharding) for a in pair) for pair in before)
    pairs = [(5, 0), (3, 1), (2, 4)]  # padded to four copies, which must not disturb block 0
    runner.copy_blocks(pairs)
    for old, new in zip(before, runner.kv_cache):
        for a, b in zip(old, new):
            expected = a.copy()
            for s, d in pairs:
                expected[:, :, d] = a[:, :, s]
            np.testing.assert_array_equal(np.asarray(b), expected)


# ---------------------------------------------------------------------------------------- quantized layouts
SMALL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=768, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=16)


def _with(params, spec_key: str, value):
    out = on_host(params)
    spec = next(s for s in model_specs(SMALL) if s.key == spec_key)
    set_leaf(out, spec, value)
    return out


def test_row_parallel_groups_that_do_not_nest_are_refused():
    params = random_params(SMALL, jnp.float32, seed=1)
    w_down = np.asarray(params["layers_0"]["w_down"])  # [768, 64]: 384 input rows per shard at TP=2
    quantized = jax.tree_util.tree_map(np.asarray, quantize(w_down, bits=8, group_size=256))
    plan = ShardingPlan(SMALL, make_mesh(2, 1))
    with pytest.raises(ShardingError, match="layers_0/w_down.*group size 256.*384"):
        plan.shard_params(_with(params, "layers_0/w_down", quantized))


def _act_order(w, perm):
    q = jax.tree_util.tree_map(np.asarray, quantize(w[perm], bits=4, group_size=32))
    return QuantizedWeight(q.qweight, q.scales, q.offsets, perm.astype(np.int32), q.bits, q.group_size)


def test_act_order_permutation_on_a_row_parallel_layer(llama_layout):
    """A GPTQ act-order permutation of a row-parallel layer is kept when it stays inside each shard's input
    rows (each shard permutes its own slice; same logits as one device), and refused when it crosses shards."""
    params = random_params(SMALL, jnp.float32, seed=2, scale=0.1)
    w_down = np.asarray(params["layers_0"]["w_down"])
    rng = np.random.default_rng(0)
    local = np.concatenate([rng.permutation(384), 384 + rng.permutation(384)])
    plan = ShardingPlan(SMALL, make_mesh(2, 1))
    with pytest.raises(ShardingError, match="act-order"):
        plan.shard_params(_with(params, "layers_0/w_down", _act_order(w_down, rng.permutation(768))))
    permuted = _with(params, "layers_0/w_down", _act_order(w_down, local))
    chunk = [SeqChunk([5, 9, 2, 7], 0, [0])]
    rows = [sampler.RowInfo(params=SamplingParams(temperature=0.0, logprobs=5), seed=0, step=0)]
    got = ModelRunner(SMALL, plan.shard_params(permuted), plan=plan, **RUNNER_ARGS).execute(chunk, rows)[0]
    want = ModelRunner(SMALL, jax.tree_util.tree_map(jnp.asarray, permuted), **RUNNER_ARGS).execute(chunk, rows)[0]
    np.testing.assert_array_equal(got.top_ids[0], want.top_ids[0])
    np.testing.assert_allclose(got.top_logprobs[0], want.top_logprobs[0], atol=1e-5)
