"""Tensor and pipeline parallelism against one device (8 virtual CPU devices): the same greedy tokens over a
prefill and several decode steps, the same top-5 logprobs, and full-vocabulary logits within tolerance, for a
random model with Llama-3-8B's head layout and for SmolLM2-135M's real weights (9 query / 3 KV heads: TP 3 splits
evenly, TP 2 / 4 / 8 replicate KV heads and pad query heads), and for a small int8 / int4 quantized model.

Tolerance: f32 weights everywhere; a sharded step sums the same terms in another order (per-shard partial sums
of the row-parallel projections, then the all-reduce), so logits differ by float rounding only:
|delta| <= 2e-4 * (1 + |logit|)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.model_runner import ModelRunner
from jaxinfer.params import Kind, iter_leaves, model_specs, set_leaf
from jaxinfer.quantization import quantize
from jaxinfer.sharding import ShardingPlan, make_mesh
from parallel_fixtures import RUNNER_ARGS, greedy_run, on_host, prefill_logits

STEPS = 5


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, vocab, n).tolist() for n in (13, 6, 19)]


def _run(config, params, plan=None, steps: int = STEPS, **runner_args):
    runner = ModelRunner(config, plan.shard_params(params) if plan else params, plan=plan,
                         **{**RUNNER_ARGS, **runner_args})
    prompts = _prompts(config.vocab_size)
    logits = prefill_logits(runner, prompts)
    tokens, (top_ids, top_lp) = greedy_run(runner, prompts, steps)
    return tokens, top_ids, top_lp, logits


def _assert_same(got, want):
    tokens, top_ids, top_lp, logits = got
    assert tokens == want[0]
    np.testing.assert_array_equal(top_ids, want[1])
    np.testing.assert_allclose(top_lp, want[2], atol=2e-4)
    np.testing.assert_allclose(logits, want[3], atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def llama_reference(llama_layout):
    return _run(*llama_layout)


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (2, 2), (2, 4)])
def test_llama3_layout_matches_one_device(llama_layout, llama_reference, tp, pp):
    config, params = llama_layout
    plan = ShardingPlan(config, make_mesh(tp, pp))
    assert plan.heads.is_identity  # 8 KV heads split evenly at TP <= 8
    _assert_same(_run(config, params, plan), llama_reference)


@pytest.fixture(scope="module")
def smollm_reference(smollm_truncated):
    return _run(*smollm_truncated)


@pytest.mark.parametrize("tp,pp", [(3, 1), (2, 1), (4, 1), (8, 1), (1, 4), (2, 2), (2, 4)])
def test_smollm2_matches_one_device(smollm_truncated, smollm_reference, tp, pp):
    config, params = smollm_truncated
    plan = ShardingPlan(config, make_mesh(tp, pp))
    assert plan.heads.is_identity == (tp in (1, 3))  # 3 KV heads: replicated unless TP divides them
    _assert_same(_run(config, params, plan), smollm_reference)


# A small model for the quantized and kernel runs (the XLA path dequantizes every packed weight each step).
SMALL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                    head_dim=16, tie_word_embeddings=False)


def _quantized(config, params, packing):
    """RTN-quantize the layer projections on the host, as both one device and a sharded model load them:
    packing(spec) -> (bits, group_size) or None to keep the weight plain."""
    out: dict = {}
    for spec, value in iter_leaves(on_host(params), model_specs(config)):
        if spec.kind == Kind.LINEAR and packing(spec):
            bits, group_size = packing(spec)
            value = jax.tree_util.tree_map(np.asarray, quantize(value, bits=bits, group_size=group_size))
        set_leaf(out, spec, value)
    return out


def test_quantized_model_matches_one_device():
    """Attention projections int8 per output channel (row-parallel o: its one group of 128 rows becomes one
    group per shard) and the MLP int4 in 32-row groups (whole groups per shard), at TP 2 x PP 2."""
    params = random_params(SMALL, np.float32, seed=4, scale=0.1)
    quantized = _quantized(SMALL, params, lambda s: (8, None) if s.name in ("wq", "wk", "wv", "wo") else (4, 32))
    plan = ShardingPlan(SMALL, make_mesh(2, 2))
    _assert_same(_run(SMALL, quantized, plan), _run(SMALL, quantized))


def test_pallas_kernels_run_per_shard():
    """Both Pallas kernels (ragged paged attention, int4 matmul; interpret mode on CPU) under shard_map, each
    shard with its own heads and weight columns / rows, against the same kernels on one device."""
    config = dataclasses.replace(SMALL, vocab_size=256, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    params = random_params(config, np.float32, seed=5, scale=0.1)
    quantized = _quantized(config, params, lambda s: (4, 32) if s.name in ("wo", "w_up", "w_down") else None)
    kernels = dict(attention_backend="pallas_interpret", matmul_backend="pallas_interpret")
    plan = ShardingPlan(config, make_mesh(2, 1))
    _assert_same(_run(config, quantized, plan, steps=2, **kernels), _run(config, quantized, steps=2, **kernels))


def test_prompt_logprobs_match_one_device(llama_layout):
    """All-token logits (prompt_logprobs) through the pipeline's micro-batches and back to chunk order, with the
    vocab-parallel log-softmax and top-20: TP 2 x PP 2 against one device."""
    from jaxinfer import SamplingParams, sampler
    from jaxinfer.batch import SeqChunk

    config, params = llama_layout
    prompts = _prompts(config.vocab_size)
    chunks = [SeqChunk(p, 0, list(range(6 * i, 6 * i + 6))) for i, p in enumerate(prompts)]
    targets = [p[1:] + [-1] for p in prompts]
    rows = [sampler.RowInfo(params=SamplingParams(temperature=0.0), seed=0, step=0)] * len(chunks)

    def run(plan=None):
        runner = ModelRunner(config, plan.shard_params(params) if plan else params, plan=plan, **RUNNER_ARGS)
        return runner.execute(chunks, rows, targets)

    (got, got_lp), (want, want_lp) = run(ShardingPlan(config, make_mesh(2, 2))), run()
    n = sum(len(p) for p in prompts)
    np.testing.assert_array_equal(got.token_ids[:3], want.token_ids[:3])
    np.testing.assert_allclose(got_lp[0][:n], want_lp[0][:n], atol=2e-4)  # each target's logprob
    np.testing.assert_array_equal(got_lp[1][:n, :5], want_lp[1][:n, :5])  # top ids
    np.testing.assert_allclose(got_lp[2][:n], want_lp[2][:n], atol=2e-4)
