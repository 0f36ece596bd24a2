"""Run jaxinfer's model on whole sequences (one prefill per sequence) for parity tests."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.batch import SeqChunk, build_step_batch
from jaxinfer.model import LlamaModel, init_kv_cache
from jaxinfer.quantization.weight import packing_of


def prefill_logits(config, params, token_ids: list[int], *, block_size: int = 16, chunk: int | None = None,
                   attention_backend: str = "xla", dtype=jnp.float32) -> np.ndarray:
    """Logits [len(token_ids), V] computed through the paged cache, optionally in prefill chunks of `chunk`
    tokens; blocks are handed out in reverse order so the block table is not the identity."""
    n = len(token_ids)
    num_blocks = math.ceil(n / block_size) + 2
    table = list(range(num_blocks - 1, 0, -1))[: math.ceil(n / block_size)]
    kv = init_kv_cache(config, num_blocks, block_size, dtype, attention_backend)
    model = LlamaModel(config, dtype=dtype, attention_backend=attention_backend, packing=packing_of(params))
    fn = jax.jit(lambda p, kv, b: model.apply({"params": p}, kv, b, all_logits=True), donate_argnums=1)
    chunk = chunk or n
    max_blocks = math.ceil(n / block_size / 16) * 16
    out = []
    for start in range(0, n, chunk):
        piece = token_ids[start:start + chunk]
        padded = 1 << (len(piece) - 1).bit_length()
        batch = build_step_batch([SeqChunk(piece, start, table)], num_tokens=max(padded, 8), num_seqs=1,
                                 max_blocks=max_blocks, block_size=block_size, num_blocks=num_blocks)
        logits, kv = fn(params, kv, batch)
        out.append(np.asarray(logits[:len(piece)]))
    return np.concatenate(out)
