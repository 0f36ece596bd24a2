"""Model runner bookkeeping: token buckets, copy-on-write block copies (checked against numpy), warm-up."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer import SamplingParams, sampler
from jaxinfer.batch import SeqChunk
from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.model_runner import ModelRunner, token_buckets

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)


def test_token_buckets_cover_every_count_with_bounded_padding():
    buckets = token_buckets(512, max_num_seqs=64)
    assert buckets[:3] == (2, 4, 8) and buckets[-1] == 512 and list(buckets) == sorted(set(buckets))
    for n in range(1, 513):
        b = next(b for b in buckets if b >= n)
        assert b - n < max(n / 2, 8)  # at most a third of the bucket (or the smallest bucket) is padding
        if 16 <= n <= 64:
            assert b - n < n / 4  # decode-sized steps: at most a fifth is padding
    assert token_buckets(100)[-1] == 100 and token_buckets(100, 128)[-1] == 100


def test_copy_blocks_copies_every_pair_and_nothing_else():
    runner = ModelRunner(TINY, random_params(TINY, jnp.float32), num_blocks=8, block_size=4, max_num_seqs=8,
                         max_num_batched_tokens=16, max_model_len=16, kv_dtype=jnp.float32,
                         attention_backend="xla", matmul_backend="xla", dtype=jnp.float32)
    rng = np.random.default_rng(0)
    runner.kv_cache = tuple((jnp.asarray(rng.standard_normal(k.shape, np.float32)),
                             jnp.asarray(rng.standard_normal(v.shape, np.float32))) for k, v in runner.kv_cache)
    before = [(np.asarray(k), np.asarray(v)) for k, v in runner.kv_cache]
    pairs = [(5, 0), (3, 1), (2, 4)]  # three copies: padded to four, which must not disturb block 0
    runner.copy_blocks(pairs)
    for (k0, v0), (k1, v1) in zip(before, runner.kv_cache):
        expected_k, expected_v = k0.copy(), v0.copy()
        for src, dst in pairs:
            expected_k[:, dst], expected_v[:, dst] = k0[:, src], v0[:, src]
        np.testing.assert_array_equal(np.asarray(k1), expected_k)
        np.testing.assert_array_equal(np.asarray(v1), expected_v)


def test_warmup_limited_to_token_counts_compiles_only_their_buckets():
    runner = ModelRunner(TINY, random_params(TINY, jnp.float32), num_blocks=8, block_size=4, max_num_seqs=8,
                         max_num_batched_tokens=16, max_model_len=16, kv_dtype=jnp.float32,
                         attention_backend="xla", matmul_backend="xla", dtype=jnp.float32)
    greedy = SamplingParams(temperature=0.0)
    runner.warmup([greedy], token_counts={3, 1})  # buckets 4 and 2 of (2, 4, 8, 16)
    assert runner.warm_buckets == (2, 4)
    compiled = runner.num_compiled()
    for tokens in ([1, 2, 3], [4]):
        row = sampler.RowInfo(params=greedy, seed=0, step=0, prompt_token_ids=tokens, output_token_ids=[])
        runner.execute([SeqChunk(tokens, 0, [0])], [row])
    assert runner.num_compiled() == compiled
