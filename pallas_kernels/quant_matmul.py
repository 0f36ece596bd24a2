"""Weight-only quantized matmul `y = x @ W` for a packed `jaxinfer.quantization.QuantizedWeight`: a Pallas
(Triton-lowered) kernel and its reference. The packed layout and the packers from GPTQ / AWQ / GGUF live in
`jaxinfer.quantization`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.quantization.weight import QuantizedWeight, dequantize

_TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100; split-K below that
_MAX_SPLITS = 16


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
      u = qw_ref[pl.ds(k0, block_k), :].astype(jnp.int32) + 128  # 8-bit codes are stored as u - 128
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
