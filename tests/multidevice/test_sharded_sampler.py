"""The sampler on vocab-split logits (shard_map over 8 devices, each holding 1/8 of a 49152-token vocabulary,
as SmolLM2's LM head is split) against the same sampler on the whole vocabulary: the same tokens for every
option (greedy, temperature, top-k, top-p, min-p, penalties with an in-flight token, min_tokens, and the exact
fallbacks for a top-k past the candidates and a nucleus past them), and the same logprobs. A shard holds whole
128-wide blocks, so even seeded random draws must pick the same token; the sampler itself is held to numpy
oracles in tests/test_sampler.py."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer.sampler import RowInfo, make_sampling_tensors, sample, sample_jit
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.sharding import PIPE, TENSOR, make_mesh
from jaxinfer.vocab_parallel import VocabShard

V, EOS = 49152, 2

ROWS = [
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=40, seed=2, logprobs=3),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.2, min_p=0.05, seed=4),
    SamplingParams(temperature=1.0, top_k=5000, seed=5),        # past the candidates: exact k-th by bisection
    SamplingParams(temperature=1.0, top_p=0.999, seed=6),       # a nucleus past the candidates
    SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.3),
    SamplingParams(temperature=0.9, min_tokens=4, stop_token_ids=[7, 49000], seed=8),
    SamplingParams(temperature=0.0, min_tokens=4),
]


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])  # (tensor, pipe): vocab over tensor, or pipe x tensor
def test_sharded_sampler_picks_the_same_tokens(mesh_shape):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(ROWS), V)) * 3).astype(np.float32)
    logits[6] = rng.standard_normal(V).astype(np.float32) * 0.01  # nearly flat: the nucleus spans most of V
    logits[0, [EOS, 11]] = logits[0].max() + 1  # a tie at the max: the lowest id wins on every shard layout
    history = rng.integers(0, V, 40).tolist()
    rows = [RowInfo(p, seed=p.seed or 0, step=1, prompt_token_ids=history[:20], output_token_ids=history[20:],
                    pending_row=3 if p.has_penalties else -1) for p in ROWS]
    tensors, flags = make_sampling_tensors(rows, len(rows), V)
    prev = np.arange(16, dtype=np.int32) * 1000  # the in-flight tokens penalties count
    want = jax.tree_util.tree_map(np.asarray, sample_jit(logits, tensors, flags, (EOS,), prev))

    mesh = make_mesh(*mesh_shape)
    axes = tuple(a for a in (PIPE, TENSOR) if mesh.shape[a] > 1)
    split = jax.device_put(logits, NamedSharding(mesh, P(None, axes)))
    fn = jax.jit(jax.shard_map(lambda x, t, p: sample(x, t, flags, (EOS,), p, vocab=VocabShard(axes)), mesh=mesh,
                               in_specs=(P(None, axes), P(), P()), out_specs=P(), check_vma=False))
    got = jax.tree_util.tree_map(np.asarray, fn(split, tensors, prev))
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    assert got.token_ids[0] == EOS
    np.testing.assert_array_equal(got.top_ids, want.top_ids)
    np.testing.assert_allclose(got.logprob, want.logprob, atol=1e-4)
    np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-4)
