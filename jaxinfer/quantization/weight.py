"""The packed (weight-only quantized) linear weight: `QuantizedWeight`, its layout and its packing.

One canonical layout for a logical weight W `[K, N]`, whatever the checkpoint format (docs/KERNELS.md):
  codes      unsigned integers u in [0, 2**bits)
             bits=4: int32 `[K // 8, N]`, row k in nibble k % 8 (bits 4*(k%8)..+3) of word k // 8 (GPTQ's layout)
             bits=8: uint8 `[K, N]`
  scales     `[K // group_size, N]` (f16 / bf16 / f32, kept as the checkpoint has them)
  offsets    optional f32 `[K // group_size, N]`; W = u * scale + offset.  None means symmetric:
             offset = -2**(bits-1) * scale.  Integer zero points z fold to offset = -z * scale (exact in f32);
             GGUF Q4_1's float minimum is an offset as is, which a (u - z) * s form could not represent.
  perm       optional int32 `[K]` (GPTQ act-order): the stored rows are W[perm], so y = x[:, perm] @ stored.

`QuantLayout` is the packing without the data (bits, group size, which optional arrays exist, the scales'
dtype): what the model declares for a packed parameter so that Flax checks the loaded leaves' shapes.
Kernels (`pallas_kernels.quant_matmul`) consume this type; nothing here imports them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


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


@dataclasses.dataclass(frozen=True)
class QuantLayout:
    """The static description of a QuantizedWeight: enough to build its abstract leaves for a given shape."""
    bits: int
    group_size: int
    scale_dtype: str
    has_offsets: bool
    has_perm: bool

    @classmethod
    def of(cls, w: "QuantizedWeight") -> "QuantLayout":
        return cls(w.bits, w.group_size, jnp.dtype(w.scales.dtype).name, w.offsets is not None, w.perm is not None)

    def zeros(self, shape) -> "QuantizedWeight":
        """A QuantizedWeight of logical shape [K, N] with zero leaves (Flax's parameter init for a packed leaf)."""
        k, n = shape
        groups = k // self.group_size
        qweight = jnp.zeros((k // 8, n), jnp.int32) if self.bits == 4 else jnp.zeros((k, n), jnp.uint8)
        return QuantizedWeight(
            qweight=qweight, scales=jnp.zeros((groups, n), self.scale_dtype),
            offsets=jnp.zeros((groups, n), jnp.float32) if self.has_offsets else None,
            perm=jnp.zeros((k,), jnp.int32) if self.has_perm else None, bits=self.bits, group_size=self.group_size)


# ---------------------------------------------------------------------------------------------- packing


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


def make_quantized(codes, scales, offsets, bits, group_size, perm=None):
    codes = np.asarray(codes)
    qweight = pack_int4(codes) if bits == 4 else codes.astype(np.uint8)
    return QuantizedWeight(
        qweight=jnp.asarray(qweight), scales=jnp.asarray(scales),
        offsets=None if offsets is None else jnp.asarray(offsets, jnp.float32),
        perm=None if perm is None else jnp.asarray(perm, jnp.int32), bits=bits, group_size=int(group_size))


def codes(w: QuantizedWeight):
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
    dense = codes(w).astype(jnp.float32) * s + b
    if w.perm is not None:
        dense = jnp.zeros_like(dense).at[w.perm].set(dense)
    return dense


def packing_of(params) -> tuple:
    """((spec key, QuantLayout), ...) for every packed weight in a nested-dict weight pytree, e.g.
    (("layers_0/wq", QuantLayout(bits=4, ...)), ...): what the model needs to declare them."""
    out = []

    def walk(node, path):
        if isinstance(node, QuantizedWeight):
            out.append(("/".join(path), QuantLayout.of(node)))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))

    walk(params, ())
    return tuple(sorted(out))
