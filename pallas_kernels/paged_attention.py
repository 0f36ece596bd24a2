"""Ragged paged attention: a Pallas (Triton-lowered) kernel and its pure-JAX oracle.

Layouts follow docs/ARCHITECTURE.md: q `[T, Hq, D]`, pages `[Hkv, num_blocks, block_size, D]`, and the flat
ragged step batch (`query_start` = cu_q_lens, `kv_lens`, `block_tables`, `num_seqs`). Prefill chunks and
decodes are mixed freely in one call. See docs/KERNELS.md for the design and the supported lowering.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Finite "minus infinity": keeps exp() and max() NaN-free for rows that see no key at all.
_MASK = -1e30
# Split-K aims to launch at least this many programs (about 2 waves on a 132-SM H100).
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a, b):
  return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------------------
# KV-cache writes (plain XLA scatters; no kernel needed)


def write_kv_pages(k_pages, v_pages, k, v, slot_mapping):
  """Scatters this step's K/V `[T, Hkv, D]` into flat slots; slots outside the cache are dropped (padding)."""
  num_kv_heads, num_blocks, block_size, _ = k_pages.shape
  slot = slot_mapping.astype(jnp.int32)
  ok = (slot >= 0) & (slot < num_blocks * block_size)
  # Map every invalid slot to block `num_blocks` explicitly: JAX would wrap a negative index instead.
  blk = jnp.where(ok, slot // block_size, num_blocks)
  off = jnp.where(ok, slot % block_size, 0)

  def put(pages, x):
    return pages.at[:, blk, off].set(jnp.swapaxes(x, 0, 1).astype(pages.dtype), mode="drop")

  return put(k_pages, k), put(v_pages, v)


def quantize_kv(x, dtype=jnp.int8):
  """Per-token-head symmetric quantization of `[..., D]` -> (codes `[..., D]` of `dtype`, scales `[...]` f32)."""
  x = x.astype(jnp.float32)
  qmax = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
  scale = jnp.max(jnp.abs(x), axis=-1) / qmax
  scale = jnp.where(scale == 0, 1.0, scale)
  codes = x / scale[..., None]
  if dtype == jnp.int8:
    codes = jnp.clip(jnp.round(codes), -127, 127)
  return codes.astype(dtype), scale


def write_kv_pages_quantized(k_pages, v_pages, k_scales, v_scales, k, v, slot_mapping):
  """`write_kv_pages` for an int8/fp8 cache: quantizes K/V per token-head and scatters codes and scales."""
  kq, ks = quantize_kv(k, k_pages.dtype)
  vq, vs = quantize_kv(v, v_pages.dtype)
  k_pages, v_pages = write_kv_pages(k_pages, v_pages, kq, vq, slot_mapping)
  # The scale arrays have the page layout minus head_dim: reuse the scatter with a dummy trailing axis.
  k_scales, v_scales = write_kv_pages(k_scales[..., None], v_scales[..., None], ks[..., None],
                                      vs[..., None], slot_mapping)
  return k_pages, v_pages, k_scales[..., 0], v_scales[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Oracle


def _token_seq_and_pos(T, kv_lens, query_start, num_seqs):
  """Per flat token: (sequence row, position in its sequence, is a real token)."""
  t = jnp.arange(T, dtype=jnp.int32)
  S = kv_lens.shape[0]
  seq = jnp.searchsorted(query_start[1:], t, side="right").astype(jnp.int32)
  real = (t < query_start[num_seqs[0]]) & (seq < S)
  seq = jnp.minimum(seq, S - 1)
  q_len = query_start[seq + 1] - query_start[seq]
  pos = kv_lens[seq] - q_len + (t - query_start[seq])
  return seq, pos, real


def reference_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs, *,
                              sm_scale, sliding_window=None, soft_cap=None, k_scales=None, v_scales=None):
  """Dense pure-JAX oracle: gathers each token's whole context from the pages and does a masked softmax."""
  T, Hq, D = q.shape
  Hkv, _, block_size, _ = k_pages.shape
  S, MB = block_tables.shape
  G = Hq // Hkv

  def context(pages, scales):
    x = pages.astype(jnp.float32)
    if scales is not None:
      x = x * scales.astype(jnp.float32)[..., None]
    x = x[:, block_tables]  # [Hkv, S, MB, bs, D]
    return jnp.moveaxis(x, 0, 1).reshape(S, Hkv, MB * block_size, D)

  seq, pos, real = _token_seq_and_pos(T, kv_lens, query_start, num_seqs)
  k = context(k_pages, k_scales)[seq]  # [T, Hkv, L, D]
  v = context(v_pages, v_scales)[seq]
  qf = q.astype(jnp.float32).reshape(T, Hkv, G, D)
  s = jnp.einsum("thgd,thld->thgl", qf, k, precision="highest") * sm_scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  kv_pos = jnp.arange(MB * block_size)[None, :]
  mask = kv_pos <= pos[:, None]
  if sliding_window is not None:
    mask &= kv_pos > pos[:, None] - sliding_window
  mask = mask[:, None, None, :]
  s = jnp.where(mask, s, -jnp.inf)
  p = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)
  out = jnp.einsum("thgl,thld->thgd", p, v, precision="highest").reshape(T, Hq, D)
  return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Kernel


def _attention_kernel(meta_ref, q_ref, bt_ref, k_ref, v_ref, *refs, group_pad, block_q, block_size,
                      pages_per_block, num_splits, sm_scale, sliding_window, soft_cap, quantized):
  """One program = one work item (<= block_q query tokens of one sequence) x one KV head x one KV split.

  The query tile holds block_q tokens x group_pad q heads of the KV head as rows, so GQA shares every K/V page
  load across the whole head group, and prefill tokens of the same sequence share it too.
  """
  if quantized:
    ks_ref, vs_ref, *refs = refs
  o_ref, *lse_ref = refs
  rows, head_dim = block_q * group_pad, q_ref.shape[-1]
  block_k = pages_per_block * block_size
  num_blocks = k_ref.shape[0]
  split = pl.program_id(2)

  seq, tok0, n_tok, pos0 = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
  q = q_ref[pl.ds(tok0 * group_pad, rows), :]
  row_tok = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group_pad
  row_pos = pos0 + row_tok
  row_ok = row_tok < n_tok  # rows past the item's tokens belong to other sequences / padding

  # KV extent this item needs: causal upper end, optional sliding-window lower end; then this split's share.
  hi = pos0 + n_tok
  lo = jnp.maximum(pos0 - sliding_window + 1, 0) if sliding_window is not None else 0
  b_lo = lo // block_k
  b_hi = jnp.where(n_tok > 0, (hi + block_k - 1) // block_k, b_lo)
  per_split = (b_hi - b_lo + num_splits - 1) // num_splits
  start = b_lo + split * per_split
  count = jnp.maximum(jnp.minimum(per_split, b_hi - start), 0)

  def body(it, carry):
    acc, m_prev, l_prev = carry
    blk = start + it
    page_idx = blk * pages_per_block + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    pids = bt_ref[seq, pl.ds(blk * pages_per_block, pages_per_block)]
    # Guard: table entries past the context are never trusted (they may be stale or garbage).
    pids = jnp.where(page_idx * block_size < hi, pids, 0)
    pids = jnp.clip(pids, 0, num_blocks - 1)
    k = k_ref[pids].reshape(block_k, head_dim)
    v = v_ref[pids].reshape(block_k, head_dim)
    if quantized:  # int8/fp8 codes: upcast for the MMA, apply per-token scales outside the dot
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if quantized:
      s = s * ks_ref[pids].reshape(1, block_k).astype(jnp.float32)
    s = s * sm_scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = blk * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = row_ok[:, None] & (kv_pos <= row_pos[:, None])
    if sliding_window is not None:
      mask &= kv_pos > row_pos[:, None] - sliding_window
    s = jnp.where(mask, s, _MASK)
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp(m_prev - m_new)
    # where() (not just the mask value) so a fully-masked row contributes exactly 0, not exp(0) = 1.
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    l_new = alpha * l_prev + p.sum(axis=1)
    if quantized:
      p = p * vs_ref[pids].reshape(1, block_k).astype(jnp.float32)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, l_new

  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, count, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  if lse_ref:
    lse_ref[0][...] = jnp.where(empty, _MASK, m + jnp.log(l_safe))


def _default_tuning(T, S, Hkv, group_pad, block_size, max_blocks, block_q, pages_per_block, num_splits):
  # Aim for 64-row query tiles (fills an MMA, bounds the K/V re-reads of prefill); Triton's dot needs >= 16.
  if block_q is None:
    block_q = min(max(1, 64 // group_pad), _next_pow2(T))
  block_q = max(block_q, _cdiv(16, group_pad))
  if pages_per_block is None:  # 64-token K/V tiles, but not more pages than any sequence can own
    pages_per_block = min(max(1, 64 // block_size), _next_pow2(max_blocks))
  pages_per_block = max(pages_per_block, _cdiv(16, block_size))
  num_items = min(T, _cdiv(T, block_q) + S)
  kv_tiles = _cdiv(max_blocks, pages_per_block)
  if num_splits is None:  # split-K only when items x heads cannot fill the GPU (small-batch decode)
    num_splits = min(_MAX_SPLITS, kv_tiles, max(1, _TARGET_PROGRAMS // (num_items * Hkv)))
  return block_q, pages_per_block, max(1, min(num_splits, kv_tiles)), num_items


def _work_items(num_items, block_q, kv_lens, query_start, num_seqs):
  """Splits every sequence's query chunk into tiles of <= block_q tokens: meta rows (seq, tok0, n_tok, pos0)."""
  S = kv_lens.shape[0]
  q_lens = query_start[1:] - query_start[:-1]
  q_lens = jnp.where(jnp.arange(S) < num_seqs[0], q_lens, 0)
  n = (q_lens + block_q - 1) // block_q
  end = jnp.cumsum(n)
  begin = end - n
  w = jnp.arange(num_items, dtype=jnp.int32)
  valid = w < end[-1]
  seq = jnp.minimum(jnp.searchsorted(end, w, side="right"), S - 1).astype(jnp.int32)
  local0 = (w - begin[seq]) * block_q
  n_tok = jnp.where(valid, jnp.minimum(block_q, q_lens[seq] - local0), 0)
  tok0 = jnp.where(valid, query_start[seq] + local0, 0)
  pos0 = jnp.where(valid, kv_lens[seq] - q_lens[seq] + local0, 0)
  seq = jnp.where(valid, seq, 0)
  return jnp.stack([seq, tok0, n_tok, pos0], axis=1).astype(jnp.int32), begin


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "interpret", "block_q", "pages_per_block", "num_splits",
    "num_warps", "num_stages"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs, *, sm_scale,
                           sliding_window=None, soft_cap=None, k_scales=None, v_scales=None, interpret=False,
                           block_q=None, pages_per_block=None, num_splits=None, num_warps=4, num_stages=2):
  """Attention of a flat ragged batch against a paged KV cache. Same arguments as the reference; returns
  `[T, Hq, D]` in q's dtype (zeros for padding tokens). Tuning: block_q (query tokens per tile),
  pages_per_block (pages per K/V tile), num_splits (split-K factor), num_warps / num_stages (Triton)."""
  T, Hq, D = q.shape
  Hkv, num_blocks, block_size, _ = k_pages.shape
  S, MB = block_tables.shape
  if Hq % Hkv:
    raise ValueError(f"num_q_heads={Hq} is not a multiple of num_kv_heads={Hkv}")
  if (k_scales is None) != (v_scales is None):
    raise ValueError("pass both k_scales and v_scales or neither")
  quantized = k_scales is not None
  G = Hq // Hkv
  Gp = _next_pow2(G)
  bq, ppb, splits, W = _default_tuning(T, S, Hkv, Gp, block_size, MB, block_q, pages_per_block, num_splits)
  rows = bq * Gp

  meta, item_begin = _work_items(W, bq, kv_lens, query_start, num_seqs)
  # Query rows: [Hkv, (T + bq) * Gp, D], token-major then head-in-group, zero padded so every tile's slice
  # is in bounds and the group is a power of two (Triton tensors must be).
  qg = jnp.pad(q.reshape(T, Hkv, G, D), ((0, bq), (0, 0), (0, Gp - G), (0, 0)))
  qg = jnp.swapaxes(qg, 0, 1).reshape(Hkv, (T + bq) * Gp, D)
  # Table padded to whole K/V tiles so a tile's slice never runs past the row.
  MBp = _cdiv(MB, ppb) * ppb
  bt = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, MBp - MB)))

  kernel = functools.partial(
      _attention_kernel, group_pad=Gp, block_q=bq, block_size=block_size, pages_per_block=ppb,
      num_splits=splits, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
      quantized=quantized)
  page_spec = pl.BlockSpec((None, num_blocks, block_size, D), lambda w, h, k: (h, 0, 0, 0))
  scale_spec = pl.BlockSpec((None, num_blocks, block_size), lambda w, h, k: (h, 0, 0))
  in_specs = [
      pl.BlockSpec((None, 4), lambda w, h, k: (w, 0)),
      pl.BlockSpec((None, (T + bq) * Gp, D), lambda w, h, k: (h, 0, 0)),
      pl.BlockSpec((S, MBp), lambda w, h, k: (0, 0)),
      page_spec, page_spec] + ([scale_spec, scale_spec] if quantized else [])
  out_dtype = q.dtype if splits == 1 else jnp.float32
  out_shape = [jax.ShapeDtypeStruct((splits, W, Hkv, rows, D), out_dtype)]
  out_specs = [pl.BlockSpec((None, None, None, rows, D), lambda w, h, k: (k, w, h, 0, 0))]
  if splits > 1:  # per-split log-sum-exp, to merge the partial softmaxes afterwards
    out_shape.append(jax.ShapeDtypeStruct((splits, W, Hkv, rows), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, None, rows), lambda w, h, k: (k, w, h, 0)))
  args = [meta, qg, bt, k_pages, v_pages] + ([k_scales, v_scales] if quantized else [])
  res = pl.pallas_call(
      kernel, grid=(W, Hkv, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"ragged_paged_attention_bq{bq}_g{Gp}_ppb{ppb}_splits{splits}",
  )(*args)
  if splits > 1:
    o, lse = res
    wts = jnp.exp(lse - lse.max(axis=0, keepdims=True))  # all-empty rows: every weight 1, every o 0
    o = (wts[..., None] * o).sum(0) / wts.sum(0)[..., None]
  else:
    o = res[0][0]

  # Scatter tiles back to flat tokens: token t is row (t - tile start) of its sequence's tile.
  o = o.reshape(W, Hkv, bq, Gp, D)
  seq, _, real = _token_seq_and_pos(T, kv_lens, query_start, num_seqs)
  local = jnp.arange(T, dtype=jnp.int32) - query_start[seq]
  item = jnp.clip(item_begin[seq] + local // bq, 0, W - 1)
  out = o[item, :, local % bq, :G, :].reshape(T, Hq, D)
  return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
