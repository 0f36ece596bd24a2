"""Group-wise integer quantization as the quantizers produce it: the quantization grid of a group, round to
nearest, and `IntWeight`, the integer form GPTQ / AWQ / RTN hand to the checkpoint writer.

A weight W `[K, N]` (jaxinfer's layout: K inputs, N outputs) is cut into groups of `group_size` consecutive
inputs (in act-order, consecutive in the permuted order: `g_idx` names each input's group). Each group and output
column has a scale s and an integer zero point z, and W[k, n] = (code[k, n] - z) * s with codes in [0, 2**bits).
Scales are rounded to f16 before the codes are chosen: the checkpoint stores f16 scales, so the values the
quantizer optimises are exactly the values a reader dequantizes.

Two grids, as their reference implementations fit them:
  "gptq" (AutoGPTQ's quantizer): the range [min(w, 0), max(w, 0)]; symmetric: z = 2**(bits-1) and the range
         made symmetric around 0; asymmetric: z = round(-min / s).
  "awq"  (AutoAWQ's): asymmetric over [min(w), max(w)], z = clamp(round(-min / s), 0, 2**bits - 1).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _f16(x):
    """Round to the nearest f16 (what the checkpoint keeps), staying at least the smallest f16 subnormal."""
    return jnp.maximum(x.astype(jnp.float16).astype(jnp.float32), np.float32(2.0 ** -24))


def gptq_grid(w, bits: int, sym: bool, min_zero: int = 0):
    """Scale and zero `[N]` of one group `w [group, N]`, AutoGPTQ's min/max fit. `min_zero=1` keeps z >= 1
    (GPTQ's v1 checkpoint format stores z - 1 in `bits` bits and cannot hold z = 0)."""
    maxq = 2 ** bits - 1
    xmin = jnp.minimum(w.min(axis=0), 0.0)
    xmax = jnp.maximum(w.max(axis=0), 0.0)
    if sym:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = jnp.where(empty, -1.0, xmin), jnp.where(empty, 1.0, xmax)
    scale = _f16((xmax - xmin) / maxq)
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) // 2)
    else:
        zero = jnp.clip(jnp.round(-xmin / scale), min_zero, maxq)
    return scale, zero


def awq_grid(w, bits: int):
    """Scale and zero `[N]` of one group `w [group, N]`, AutoAWQ's asymmetric min/max fit."""
    maxq = 2 ** bits - 1
    lo, hi = w.min(axis=0), w.max(axis=0)
    scale = _f16(jnp.maximum(hi - lo, 1e-5) / maxq)
    return scale, jnp.clip(jnp.round(-lo / scale), 0, maxq)


def codes_of(w, scale, zero, bits: int):
    """Round to nearest on the grid: integer codes (as f32) of `w` for per-column `scale`, `zero`."""
    return jnp.clip(jnp.round(w / scale) + zero, 0, 2 ** bits - 1)


def fake_quantize(w, scale, zero, bits: int):
    """The grid value nearest `w`: (code - z) * s."""
    return (codes_of(w, scale, zero, bits) - zero) * scale


def grouped(fit, w, group_size: int):
    """Apply `fit(group [gs, N]) -> (scale [N], zero [N])` to every group of `w [K, N]`: `[G, N]` each."""
    K, N = w.shape
    return jax.vmap(fit)(w.reshape(K // group_size, group_size, N))


def fake_quantize_groups(w, scale, zero, bits: int, group_size: int):
    """Fake-quantize `w [K, N]` with per-group `scale`, `zero` `[G, N]` (consecutive groups)."""
    K, N = w.shape
    g = w.reshape(K // group_size, group_size, N)
    return fake_quantize(g, scale[:, None], zero[:, None], bits).reshape(K, N)


@dataclasses.dataclass(frozen=True)
class IntWeight:
    """A quantized `[K, N]` weight in integer form: W[k, n] = (codes[k, n] - zeros[g, n]) * scales[g, n] with
    g = g_idx[k]. Rows are in the weight's own order; with act-order g_idx is not monotonic."""
    codes: np.ndarray    # uint8 [K, N]
    scales: np.ndarray   # float16 [G, N]
    zeros: np.ndarray    # int32 [G, N]
    g_idx: np.ndarray    # int32 [K]
    bits: int
    group_size: int      # the input dimension K for one group per column (group_size -1 in the formats)
    sym: bool

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        s = self.scales.astype(np.float32)[self.g_idx]
        return (self.codes.astype(np.float32) - self.zeros[self.g_idx].astype(np.float32)) * s


def int_weight(codes, scales, zeros, bits: int, group_size: int, sym: bool, g_idx=None) -> IntWeight:
    """An IntWeight from device arrays (codes and zeros as integral floats, scales already f16-exact)."""
    codes = np.asarray(codes)
    K = codes.shape[0]
    g_idx = np.arange(K, dtype=np.int32) // group_size if g_idx is None else np.asarray(g_idx, np.int32)
    return IntWeight(codes.astype(np.uint8), np.asarray(scales, np.float32).astype(np.float16),
                     np.asarray(zeros).astype(np.int32), g_idx, bits, group_size, sym)


def check_settings(K: int, bits: int, group_size: int) -> int:
    """The effective group size (-1 -> K), or a ValueError naming the unsupported setting."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported (4 or 8)")
    gs = K if group_size in (-1, None) else int(group_size)
    if gs <= 0 or K % gs:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {K}")
    if K % (32 // bits):
        raise ValueError(f"input dimension {K} is not a multiple of {32 // bits} ({bits}-bit codes pack 32 bits)")
    return gs


def rtn(w, bits: int = 4, group_size: int = 128, sym: bool = True, min_zero: int = 0) -> IntWeight:
    """Round-to-nearest on GPTQ's grid (the baseline GPTQ improves on): each group fitted on its own weights."""
    w = jnp.asarray(w, jnp.float32)
    gs = check_settings(w.shape[0], bits, group_size)
    return int_weight(*_rtn(w, bits, gs, sym, min_zero), bits, gs, sym)


@functools.partial(jax.jit, static_argnames=("bits", "gs", "sym", "min_zero"))
def _rtn(w, bits, gs, sym, min_zero):
    scale, zero = grouped(lambda g: gptq_grid(g, bits, sym, min_zero), w, gs)
    codes = codes_of(w.reshape(-1, gs, w.shape[1]), scale[:, None], zero[:, None], bits).reshape(w.shape)
    return codes, scale, zero
