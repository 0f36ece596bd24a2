"""Models and helpers shared by the multi-device tests (tests/multidevice/, run in their own process with 8
virtual CPU devices by tests/test_multidevice.py). Imported into conftest.py so session fixtures are shared."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import SamplingParams, sampler
from jaxinfer.batch import SeqChunk
from jaxinfer.config import ModelConfig

# Llama-3-8B's attention layout (32 query heads, 8 KV heads, head_dim 128) with a small hidden size, few
# layers and an odd vocabulary (1001: padded when split over the devices).
LLAMA3_LAYOUT = ModelConfig(vocab_size=1001, hidden_size=128, intermediate_size=1024, num_layers=4, num_heads=32,
                            num_kv_heads=8, head_dim=128, rope_theta=500000.0, tie_word_embeddings=False,
                            name="llama3-8b-layout")
SMOLLM_LAYERS = 4  # SmolLM2-135M's real weights and head layout (9 / 3 heads), its first layers only

RUNNER_ARGS = dict(num_blocks=24, block_size=8, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                   kv_dtype=jnp.float32, attention_backend="xla", matmul_backend="xla", dtype=jnp.float32)


@pytest.fixture(scope="session")
def llama_layout():
    from jaxinfer.loaders.common import random_params

    return LLAMA3_LAYOUT, random_params(LLAMA3_LAYOUT, jnp.float32, seed=3, scale=0.05)


@pytest.fixture(scope="session")
def smollm_truncated(gguf_path):
    """(config, params) of SmolLM2-135M cut to its first SMOLLM_LAYERS layers, f32, on the host."""
    from jaxinfer.loaders.gguf import open_gguf_checkpoint

    checkpoint = open_gguf_checkpoint(gguf_path)
    config = dataclasses.replace(checkpoint.config, num_layers=SMOLLM_LAYERS)
    keep = {f"layers_{i}" for i in range(SMOLLM_LAYERS)}
    params = checkpoint.load(jnp.float32, place=lambda spec, host: host)  # numpy: nothing on a device yet
    return config, {k: v for k, v in params.items() if not k.startswith("layers_") or k in keep}


def greedy_run(runner, prompts: list[list[int]], steps: int, blocks_per_seq: int = 6):
    """Prefill every prompt in one step, then `steps - 1` greedy decode steps of all of them together, through
    the runner's launch/fetch (async scheduling's path). Returns (tokens [steps][n], first step's top-5 ids and
    logprobs)."""
    greedy = SamplingParams(temperature=0.0, logprobs=5)
    seqs = [list(p) for p in prompts]
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    starts = [0] * len(prompts)
    tokens, first = [], None
    pad = _one_bucket(runner, prompts)
    for step in range(steps):
        chunks = [SeqChunk(s[st:], st, t) for s, st, t in zip(seqs, starts, tables)]
        rows = [sampler.RowInfo(params=greedy, seed=0, step=step) for _ in chunks]
        out, _ = runner.fetch(runner.launch(chunks, rows, min_tokens=pad))
        if first is None:
            first = (out.top_ids[:len(prompts)], out.top_logprobs[:len(prompts)])
        new = [int(t) for t in out.token_ids[:len(prompts)]]
        tokens.append(new)
        for i, t in enumerate(new):
            starts[i] = len(seqs[i])
            seqs[i].append(t)
    return tokens, first


def prefill_logits(runner, prompts: list[list[int]], blocks_per_seq: int = 6) -> np.ndarray:
    """Full-vocabulary logits [n, V] of each prompt's last token, straight from the forward (the same batch as
    greedy_run's first step, gathered to the host for the check)."""
    chunks = [SeqChunk(list(p), 0, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
              for i, p in enumerate(prompts)]
    batch = runner.prepare(chunks, min_tokens=_one_bucket(runner, prompts))
    (logits, _), runner.kv_cache = runner._forward(runner.params, runner.kv_cache, batch, None,
                                                   runner._no_prev_tokens)
    return np.asarray(jax.device_get(logits))[:len(prompts), :runner.config.vocab_size]


def _one_bucket(runner, prompts) -> int:
    """Pad every step (and each of its micro-batches) to the prefill's size: one compiled forward per test."""
    return runner.num_microbatches * sum(len(p) for p in prompts)


def on_host(params):
    """A placed or device weight pytree as numpy (for re-sharding the same values another way)."""
    return jax.tree_util.tree_map(np.asarray, params)
