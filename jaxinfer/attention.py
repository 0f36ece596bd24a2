"""Paged attention over the flat ragged batch: backend dispatch and the XLA (non-Pallas) path.

The XLA path is what the engine uses on CPU. Each query token attends to its own sequence's pages, walked
in chunks of `chunk_blocks` pages with an online softmax, and the loop stops at the longest context in the
batch (a dynamic trip count), so a step touches only live KV and the compiled shape does not depend on
context length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.batch import StepBatch

DEFAULT_CHUNK_BLOCKS = 4


def default_attention_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Scatter this step's K/V ([T, KVH, D]) into flat slots; out-of-range slots (padding) are dropped."""
    kvh, nb, bs, d = k_pages.shape

    def write(pages, new):
        flat = pages.reshape(kvh, nb * bs, d)
        flat = flat.at[:, slot_mapping].set(new.transpose(1, 0, 2).astype(pages.dtype), mode="drop")
        return flat.reshape(kvh, nb, bs, d)

    return write(k_pages, k), write(v_pages, v)


def token_block_tables(batch: StepBatch, chunk_blocks: int) -> jax.Array:
    """Each token's block table, padded to a multiple of chunk_blocks ([T, MB']); computed once per step."""
    tables = batch.block_tables[batch.seq_ids]
    pad = (-tables.shape[1]) % chunk_blocks
    return jnp.pad(tables, ((0, 0), (0, pad))) if pad else tables


def xla_paged_attention(q, k_pages, v_pages, batch: StepBatch, *, sm_scale: float, sliding_window=None,
                        soft_cap=None, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS, token_tables=None):
    num_tokens, num_heads, head_dim = q.shape
    kvh, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // kvh
    chunk = chunk_blocks * block_size
    if token_tables is None:
        token_tables = token_block_tables(batch, chunk_blocks)
    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, kvh, group, head_dim).transpose(1, 0, 2, 3)
    pos = batch.positions[:, None]
    max_len = jnp.max(batch.kv_lens)
    num_chunks = (max_len + chunk - 1) // chunk

    # Gathering whole pages as rows of a 2-D array is several times faster on XLA CPU than a gather on axis 1.
    k_rows = k_pages.reshape(kvh * num_blocks, block_size * head_dim)
    v_rows = v_pages.reshape(kvh * num_blocks, block_size * head_dim)
    head_offset = (jnp.arange(kvh, dtype=jnp.int32) * num_blocks)[:, None, None]

    def body(c, carry):
        m, l, acc = carry
        blocks = lax.dynamic_slice_in_dim(token_tables, c * chunk_blocks, chunk_blocks, axis=1)  # [T, CB]
        rows = head_offset + blocks[None]  # [KVH, T, CB]; block ids are always < num_blocks
        k = k_rows.at[rows].get(mode="promise_in_bounds").reshape(kvh, num_tokens, chunk, head_dim)
        v = v_rows.at[rows].get(mode="promise_in_bounds").reshape(kvh, num_tokens, chunk, head_dim)
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        s = jnp.einsum("ktgd,ktcd->ktgc", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = c * chunk + jnp.arange(chunk)[None, :]
        mask = kv_pos <= pos
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        s = jnp.where(mask[None, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("ktgc,ktcd->ktgd", p, v)
        return m_new, l, acc

    init = (jnp.full((kvh, num_tokens, group), -jnp.inf, jnp.float32),
            jnp.zeros((kvh, num_tokens, group), jnp.float32),
            jnp.zeros((kvh, num_tokens, group, head_dim), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding tokens see no keys: output 0
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def paged_attention(q, k_pages, v_pages, batch: StepBatch, *, sm_scale: float, sliding_window=None,
                    soft_cap=None, backend: str = "xla", token_tables=None):
    if backend == "xla":
        return xla_paged_attention(q, k_pages, v_pages, batch, sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap, token_tables=token_tables)
    if backend in ("pallas", "pallas_interpret"):
        from pallas_kernels.paged_attention import ragged_paged_attention

        return ragged_paged_attention(q, k_pages, v_pages, batch.kv_lens, batch.block_tables, batch.query_start,
                                      batch.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, interpret=backend == "pallas_interpret")
    if backend == "reference":
        from pallas_kernels.paged_attention import reference_paged_attention

        return reference_paged_attention(q, k_pages, v_pages, batch.kv_lens, batch.block_tables,
                                         batch.query_start, batch.num_seqs, sm_scale=sm_scale,
                                         sliding_window=sliding_window, soft_cap=soft_cap)
    raise ValueError(f"unknown attention_backend {backend!r}; expected 'xla', 'pallas', 'pallas_interpret' "
                     "or 'reference'")
