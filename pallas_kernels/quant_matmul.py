"""Weight-only quantized matmul `y = x @ W`: a Pallas (Triton-lowered) kernel, its reference, and load-time
repackers from GPTQ / AWQ / GGUF (Q4_0, Q4_1, Q8_0) into one canonical layout.

Canonical layout of a logical weight W `[K, N]` (see docs/KERNELS.md):
  codes      unsigned integers u in [0, 2**bits)
             bits=4: int32 `[K // 8, N]`, row k in nibble k % 8 (bits 4*(k%8)..+3) of word k // 8 (GPTQ's layout)
             bits=8: uint8 `[K, N]`
  scales     `[K // group_size, N]` (f16 / bf16 / f32, kept as the checkpoint has them)
  offsets    optional f32 `[K // group_size, N]`; W = u * scale + offset.  None means symmetric:
             offset = -2**(bits-1) * scale.  Integer zero points z fold to offset = -z * scale (exact in f32);
             GGUF Q4_1's float minimum is an offset as is, which a (u - z) * s form could not represent.
  perm       optional int32 `[K]` (GPTQ act-order): the stored rows are W[perm], so y = x[:, perm] @ stored.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100; split-K below that
_MAX_SPLITS = 16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["qweight", "scales", "offsets", "perm"], meta_fields=["bits", "group_size"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  qweight: jax.Array
  scales: jax.Array
  offsets: Optional[jax.Array]
  perm: Optional[jax.Array]
  bits: int
  group_size: int

  @property
  def shape(self):
    k = self.qweight.shape[0] * (8 if self.bits == 4 else 1)
    return (k, self.qweight.shape[1])

  @property
  def dtype(self):
    return self.scales.dtype


# ----------------------------------------------------------------------------------------------------------
# Packing helpers (numpy, load time)


def pack_int4(codes):
  """uint codes `[K, N]` (values < 16) -> int32 `[K // 8, N]`, row k in nibble k % 8."""
  codes = np.asarray(codes, np.uint32).reshape(-1, 8, codes.shape[1])
  words = np.zeros((codes.shape[0], codes.shape[2]), np.uint32)
  for j in range(8):
    words |= codes[:, j, :] << np.uint32(4 * j)
  return words.view(np.int32)


def unpack_int4(words):
  """Inverse of `pack_int4`: int32 `[K // 8, N]` -> uint8 `[K, N]`."""
  w = np.asarray(words).view(np.uint32)
  codes = np.stack([(w >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=1)
  return codes.reshape(-1, w.shape[1]).astype(np.uint8)


def _make(codes, scales, offsets, bits, group_size, perm=None):
  codes = np.asarray(codes)
  qweight = pack_int4(codes) if bits == 4 else codes.astype(np.uint8)
  return QuantizedWeight(
      qweight=jnp.asarray(qweight), scales=jnp.asarray(scales),
      offsets=None if offsets is None else jnp.asarray(offsets, jnp.float32),
      perm=None if perm is None else jnp.asarray(perm, jnp.int32), bits=bits, group_size=int(group_size))


def _codes(w: QuantizedWeight):
  if w.bits == 4:  # unpack in jnp so dequantize works on device too
    shifts = (4 * jnp.arange(8, dtype=jnp.uint32))[None, :, None]
    u = (w.qweight.astype(jnp.uint32)[:, None, :] >> shifts) & 0xF
    return u.reshape(-1, w.qweight.shape[1])
  return w.qweight


def dequantize(w: QuantizedWeight):
  """Full-precision f32 `[K, N]` in the original row order (for references and tests only)."""
  K, N = w.shape
  s = jnp.repeat(w.scales.astype(jnp.float32), w.group_size, axis=0)
  b = (-(2.0 ** (w.bits - 1)) * s if w.offsets is None
       else jnp.repeat(w.offsets.astype(jnp.float32), w.group_size, axis=0))
  dense = _codes(w).astype(jnp.float32) * s + b
  if w.perm is not None:
    dense = jnp.zeros_like(dense).at[w.perm].set(dense)
  return dense


def quantize(w_float, bits=4, group_size=128, symmetric=True, scale_dtype=jnp.float32):
  """Round-to-nearest quantization of a float `[K, N]` weight. group_size None/-1 = per output channel."""
  w = np.asarray(w_float, np.float32)
  K, N = w.shape
  gs = K if group_size in (None, -1) else group_size
  if K % gs or (bits == 4 and K % 8) or bits not in (4, 8):
    raise ValueError(f"unsupported: K={K}, bits={bits}, group_size={gs}")
  g = w.reshape(K // gs, gs, N)
  qmax = 2 ** bits - 1
  if symmetric:
    mid = 2 ** (bits - 1)
    scale = np.abs(g).max(axis=1) / (mid - 1)
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype)
    s32 = np.asarray(scale, np.float32)[:, None, :]
    codes = np.clip(np.round(g / s32) + mid, 0, qmax)
    offsets = None
  else:  # min/max with a float offset (the minimum), as in GGUF Q4_1
    lo, hi = g.min(axis=1), g.max(axis=1)
    scale = (hi - lo) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype)
    s32 = np.asarray(scale, np.float32)[:, None, :]
    codes = np.clip(np.round((g - lo[:, None, :]) / s32), 0, qmax)
    offsets = lo
  return _make(codes.reshape(K, N).astype(np.uint8), scale, offsets, bits, gs)


# ----------------------------------------------------------------------------------------------------------
# Repackers (numpy, run once at load time)


def _unpack_words(words, bits, axis):
  """Unpack `32 // bits` fields per int32, lowest bits first, along `axis` of `words`."""
  w = np.asarray(words).view(np.uint32)
  pf, mask = 32 // bits, np.uint32(2 ** bits - 1)
  fields = np.stack([(w >> np.uint32(bits * j)) & mask for j in range(pf)], axis=axis + 1)
  shape = list(w.shape)
  shape[axis] *= pf
  return fields.reshape(shape).astype(np.int32)


def from_gptq(qweight, qzeros, scales, g_idx=None, *, bits=4, group_size=128):
  """GPTQ (AutoGPTQ / exllama v1 format): qweight int32 `[K*bits/32, N]` packed along K, qzeros int32
  `[G, N*bits/32]` packed along N storing zero-1, scales `[G, N]`, optional act-order g_idx `[K]`.
  Act-order is resolved by sorting K rows by group and storing the permutation (applied to x's columns)."""
  codes = _unpack_words(qweight, bits, axis=0)
  K, N = codes.shape
  zeros = _unpack_words(qzeros, bits, axis=1) + 1  # v1 "+1" convention
  scales = np.asarray(scales)
  gs = K if group_size in (None, -1) else group_size
  perm = None
  if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(K) // gs):
    g_idx = np.asarray(g_idx)
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], np.arange(K) // gs):
      raise ValueError("g_idx groups are not all of size group_size; cannot make them contiguous")
    codes = codes[perm]
  if np.all(zeros == 2 ** (bits - 1)):
    offsets = None  # symmetric checkpoint: the implicit zero is exact and saves a load
  else:
    offsets = -zeros.astype(np.float32) * scales.astype(np.float32)
  return _make(codes, scales, offsets, bits, gs, perm)


# AWQ packs columns 8n + AWQ_ORDER[j] into nibble j of word n.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_awq(words):
  nib = _unpack_words(words, 4, axis=1)  # column 8n + j holds nibble j
  rows, cols = nib.shape
  out = np.empty_like(nib).reshape(rows, cols // 8, 8)
  out[:, :, list(AWQ_ORDER)] = nib.reshape(rows, cols // 8, 8)
  return out.reshape(rows, cols)


def from_awq(qweight, qzeros, scales, *, group_size=128):
  """AWQ GEMM format (4-bit): qweight int32 `[K, N // 8]` and qzeros `[G, N // 8]` packed along N in AWQ's
  order, scales `[G, N]`; W = (q - z) * s with no zero offset convention."""
  codes = _unpack_awq(qweight)
  zeros = _unpack_awq(qzeros)
  scales = np.asarray(scales)
  offsets = -zeros.astype(np.float32) * scales.astype(np.float32)
  return _make(codes, scales, offsets, 4, group_size)


_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def from_gguf(data, qtype):
  """GGUF Q4_0 / Q4_1 / Q8_0 raw blocks: `tensor.data` uint8 `[N, K // 32 * block_bytes]` (GGUF row = HF
  output row, blocks of 32 run along the input dim K) -> QuantizedWeight of logical shape `[K, N]`."""
  name = getattr(qtype, "name", str(qtype))
  if name not in _GGUF_BLOCK_BYTES:
    raise ValueError(f"unsupported GGUF type {name}")
  data = np.ascontiguousarray(data, np.uint8)
  N = data.shape[0]
  blocks = data.reshape(N, -1, _GGUF_BLOCK_BYTES[name])  # [N, K / 32, bytes]
  d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [N, K / 32]
  if name == "Q8_0":
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.int32) + 128  # implicit zero 128
    codes, offsets, bits = q, None, 8
  else:
    qs = blocks[..., 4:20] if name == "Q4_1" else blocks[..., 2:18]
    # element j < 16: low nibble of byte j; element j >= 16: high nibble of byte j - 16
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    bits = 4
    offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0].T.astype(np.float32) if name == "Q4_1" else None
  codes = codes.reshape(N, -1).T  # [K, N]
  return _make(codes.astype(np.uint8), d.T, offsets, bits, 32)


# ----------------------------------------------------------------------------------------------------------
# Kernel


def _qmm_kernel(x_ref, qw_ref, s_ref, *refs, bits, group_size, block_k, k_per_split, has_offsets):
  """One program = a [block_m, block_n] output tile over one K split. Codes are unpacked and scaled in
  registers: the K tile lies inside one quantization group, so the scale and offset factor out of the dot:
      x @ (u * s + b) = (x @ u) * s + rowsum(x) * b
  and x @ u runs on the MMA units in x's dtype (codes < 256 are exact in f16 / bf16)."""
  if has_offsets:
    b_ref, o_ref = refs
  else:
    (o_ref,) = refs
  split = pl.program_id(2)

  def body(i, acc):
    k0 = split * k_per_split + i * block_k
    x = x_ref[:, pl.ds(k0, block_k)]
    if bits == 4:
      packed = qw_ref[pl.ds(k0 // 8, block_k // 8), :]
      shifts = 4 * lax.broadcasted_iota(jnp.int32, (1, 8, 1), 1)
      u = lax.shift_right_logical(packed[:, None, :], shifts) & 0xF
      u = u.reshape(block_k, packed.shape[-1])
    else:
      u = qw_ref[pl.ds(k0, block_k), :].astype(jnp.int32)
    xu = jnp.dot(x, u.astype(x.dtype), preferred_element_type=jnp.float32)
    g = k0 // group_size
    s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
    b = b_ref[pl.ds(g, 1), :] if has_offsets else -(2.0 ** (bits - 1)) * s
    xsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
    return acc + xu * s + xsum * b

  acc = lax.fori_loop(0, k_per_split // block_k, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _pick_block(n, cap):
  for b in (128, 64, 32, 16):
    if b <= cap and n % b == 0:
      return b
  raise ValueError(f"dimension {n} must be a multiple of 16")


def _tuning(M, K, N, group_size, block_m, block_n, block_k, num_splits):
  block_m = block_m or min(64, max(16, 1 << (M - 1).bit_length()))
  block_n = block_n or _pick_block(N, 128)
  block_k = block_k or _pick_block(group_size, 128)
  if group_size % block_k or K % block_k:
    raise ValueError(f"block_k={block_k} must divide group_size={group_size} and K={K}")
  nk = K // block_k
  if num_splits is None:  # small M gives few tiles: split K so the GPU has enough programs
    want = max(1, _TARGET_PROGRAMS // (pl.cdiv(M, block_m) * (N // block_n)))
    num_splits = max(d for d in range(1, min(want, _MAX_SPLITS, nk) + 1) if nk % d == 0)
  if nk % num_splits:
    raise ValueError(f"num_splits={num_splits} must divide K // block_k = {nk}")
  return block_m, block_n, block_k, num_splits


@functools.partial(jax.jit, static_argnames=(
    "interpret", "block_m", "block_n", "block_k", "num_splits", "num_warps", "num_stages"))
def quant_matmul(x, w: QuantizedWeight, *, interpret=False, block_m=None, block_n=None, block_k=None,
                 num_splits=None, num_warps=4, num_stages=3):
  """`x [..., K] @ W [K, N]` with W quantized; f32 accumulation, output in x's dtype."""
  K, N = w.shape
  lead = x.shape[:-1]
  x = x.reshape(-1, K)
  if w.perm is not None:
    x = jnp.take(x, w.perm, axis=1)
  M = x.shape[0]
  bm, bn, bk, splits = _tuning(M, K, N, w.group_size, block_m, block_n, block_k, num_splits)
  Mp = pl.cdiv(M, bm) * bm
  x = jnp.pad(x, ((0, Mp - M), (0, 0)))  # Triton tiles are powers of two; pad the (cheap) activations
  G = K // w.group_size
  kpack = K // 8 if w.bits == 4 else K
  in_specs = [pl.BlockSpec((bm, K), lambda i, j, s: (i, 0)),
              pl.BlockSpec((kpack, bn), lambda i, j, s: (0, j)),
              pl.BlockSpec((G, bn), lambda i, j, s: (0, j))]
  args = [x, w.qweight, w.scales]
  if w.offsets is not None:
    in_specs.append(pl.BlockSpec((G, bn), lambda i, j, s: (0, j)))
    args.append(w.offsets)
  out_dtype = x.dtype if splits == 1 else jnp.float32
  kernel = functools.partial(_qmm_kernel, bits=w.bits, group_size=w.group_size, block_k=bk,
                             k_per_split=K // splits, has_offsets=w.offsets is not None)
  out = pl.pallas_call(
      kernel, grid=(Mp // bm, N // bn, splits), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
      out_shape=jax.ShapeDtypeStruct((splits, Mp, N), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"quant_matmul_int{w.bits}_g{w.group_size}_{bm}x{bn}x{bk}_s{splits}",
  )(*args)
  out = out[0] if splits == 1 else out.sum(0)
  return out[:M].astype(x.dtype).reshape(*lead, N)


def reference_quant_matmul(x, w: QuantizedWeight):
  """Dequantize to f32, then a plain dot."""
  y = jnp.dot(x.astype(jnp.float32), dequantize(w), precision="highest")
  return y.astype(x.dtype)
