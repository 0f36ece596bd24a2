"""Paged attention over the flat ragged batch: backend dispatch and the XLA (non-Pallas) path.

The XLA path is what the engine uses on CPU. Each query token attends to its own sequence's pages, walked
in chunks of `chunk_blocks` pages with an online softmax. Tokens are sorted by context length and split into a
few groups; each group's loop stops at its own longest context (a dynamic trip count), so a step touches little
more than live KV and the compiled shape does not depend on context length.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.batch import StepBatch

DEFAULT_CHUNK_BLOCKS = 4


def default_attention_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def keys_transposed(backend: str) -> bool:
    """The XLA path stores K pages as [KVH, num_blocks, head_dim, block_size]: on XLA CPU, q.K^T with K's
    head_dim on the middle axis runs about 1.3x faster per layer than with it last. V pages, and K pages for the
    Pallas kernel and the reference, are [KVH, num_blocks, block_size, head_dim]."""
    return backend == "xla"


def write_kv(k_pages, v_pages, k, v, slot_mapping, *, keys_transposed: bool = False):
    """Scatter this step's K/V ([T, KVH, D]) into flat slots; out-of-range slots (padding) are dropped."""
    kvh, nb, bs, d = v_pages.shape

    def write(pages, new):
        flat = pages.reshape(kvh, nb * bs, d)
        flat = flat.at[:, slot_mapping].set(new.transpose(1, 0, 2).astype(pages.dtype), mode="drop")
        return flat.reshape(kvh, nb, bs, d)

    if keys_transposed:  # pages[:, block, :, offset] = k[t]; block == nb for padding slots, so dropped
        blocks, offsets = slot_mapping // bs, slot_mapping % bs
        k_pages = k_pages.at[:, blocks, :, offsets].set(k.astype(k_pages.dtype), mode="drop")
    else:
        k_pages = write(k_pages, k)
    return k_pages, write(v_pages, v)


class XlaAttentionPlan(NamedTuple):
    """Per-step metadata shared by every layer: tokens sorted by context length, split into groups."""
    order: jax.Array        # [T] token permutation, longest context first
    inverse: jax.Array      # [T] its inverse
    positions: jax.Array    # [T] sorted query positions
    tables: jax.Array       # [T, MB'] sorted per-token block tables, MB' a multiple of the chunk
    chunk_ranges: jax.Array  # [G, 2] first and end chunk each group must visit


def plan_xla_attention(batch: StepBatch, *, block_size: int, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
                       sliding_window=None) -> XlaAttentionPlan:
    """Sort tokens by position (longest context first) and cut them into a few static groups, each of which
    walks only the KV chunks its own tokens need. Without this every token would walk to the longest context in
    the batch; in a continuous batch contexts range from a few tokens to thousands."""
    positions = batch.positions
    num_tokens = positions.shape[0]
    order = jnp.argsort(-positions, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(num_tokens, dtype=jnp.int32))
    pos = positions[order]
    tables = batch.block_tables[batch.seq_ids[order]]
    pad = (-tables.shape[1]) % chunk_blocks
    tables = jnp.pad(tables, ((0, 0), (0, pad))) if pad else tables
    chunk = chunk_blocks * block_size
    groups = pos.reshape(_num_groups(num_tokens), -1)
    end = groups[:, 0] // chunk + 1  # the group's longest context (sorted descending)
    start = jnp.zeros_like(end)
    if sliding_window is not None:  # chunks wholly before every token's window are skipped too
        start = jnp.maximum(groups[:, -1] - sliding_window + 1, 0) // chunk
    return XlaAttentionPlan(order, inverse, pos, tables, jnp.stack([start, end], axis=1))


def _num_groups(num_tokens: int) -> int:
    """Static group count: enough to cut most of the padding work, few enough to keep each group's ops large."""
    for groups in (4, 2):
        if num_tokens % groups == 0 and num_tokens // groups >= 8:
            return groups
    return 1


def xla_paged_attention(q, k_pages, v_pages, batch: StepBatch, *, sm_scale: float, sliding_window=None,
                        soft_cap=None, chunk_blocks: int = DEFAULT_CHUNK_BLOCKS, plan: XlaAttentionPlan | None = None):
    num_tokens, num_heads, head_dim = q.shape
    kvh, num_blocks, block_size, _ = v_pages.shape  # k_pages: [KVH, NB, D, BS] (keys_transposed)
    group = num_heads // kvh
    chunk = chunk_blocks * block_size
    if plan is None:
        plan = plan_xla_attention(batch, block_size=block_size, chunk_blocks=chunk_blocks,
                                  sliding_window=sliding_window)
    num_groups = plan.chunk_ranges.shape[0]
    per_group = num_tokens // num_groups
    q_sorted = (q.astype(jnp.float32) * sm_scale)[plan.order]
    # Gathering whole pages as rows of a 2-D array is several times faster on XLA CPU than a gather on axis 1.
    k_rows = k_pages.reshape(kvh * num_blocks, head_dim * block_size)
    v_rows = v_pages.reshape(kvh * num_blocks, block_size * head_dim)
    head_offset = (jnp.arange(kvh, dtype=jnp.int32) * num_blocks)[:, None, None]

    def attend(qg, pos, tables, first_chunk, end_chunk):
        """Online softmax of one token group ([KVH, n, G, D] queries) over KV chunks [first, end)."""
        n = qg.shape[1]

        def body(c, carry):
            m, l, acc = carry
            blocks = lax.dynamic_slice_in_dim(tables, c * chunk_blocks, chunk_blocks, axis=1)  # [n, CB]
            rows = head_offset + blocks[None]  # [KVH, n, CB]; block ids are always < num_blocks
            k = k_rows.at[rows].get(mode="promise_in_bounds").reshape(kvh, n, 1, chunk_blocks, head_dim, block_size)
            v = v_rows.at[rows].get(mode="promise_in_bounds").reshape(kvh, n, chunk, head_dim)
            # A broadcast multiply and a sum over head_dim: XLA CPU fuses it into one pass over the gathered keys.
            s = (qg[:, :, :, None, :, None] * k.astype(jnp.float32)).sum(-2).reshape(kvh, n, group, chunk)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            kv_pos = c * chunk + jnp.arange(chunk)[None, :]
            mask = kv_pos <= pos[:, None]
            if sliding_window is not None:
                mask &= kv_pos > pos[:, None] - sliding_window
            s = jnp.where(mask[None, :, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("ktgc,ktcd->ktgd", p, v.astype(jnp.float32))
            return m_new, l, acc

        init = (jnp.full((kvh, n, group), -jnp.inf, jnp.float32), jnp.zeros((kvh, n, group), jnp.float32),
                jnp.zeros((kvh, n, group, head_dim), jnp.float32))
        _, l, acc = lax.fori_loop(first_chunk, end_chunk, body, init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None]  # a token that sees no keys (padding) gets 0

    outs = []
    for g in range(num_groups):
        sl = slice(g * per_group, (g + 1) * per_group)
        qg = q_sorted[sl].reshape(per_group, kvh, group, head_dim).transpose(1, 0, 2, 3)
        out = attend(qg, plan.positions[sl], plan.tables[sl], plan.chunk_ranges[g, 0], plan.chunk_ranges[g, 1])
        outs.append(out.transpose(1, 0, 2, 3).reshape(per_group, num_heads, head_dim))
    return jnp.concatenate(outs)[plan.inverse].astype(q.dtype)


def paged_attention(q, k_pages, v_pages, batch: StepBatch, *, sm_scale: float, sliding_window=None,
                    soft_cap=None, backend: str = "xla", plan: XlaAttentionPlan | None = None):
    if backend == "xla":
        return xla_paged_attention(q, k_pages, v_pages, batch, sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap, plan=plan)
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
