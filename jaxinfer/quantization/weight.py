"""The packed (weight-only quantized) linear weight: `QuantizedWeight`, its layout and its packing.

One canonical layout for a logical weight W `[K, N]`, whatever the checkpoint format (docs/KERNELS.md):
  codes      unsigned integers u in [0, 2**bits)
             bits=4: int32 `[K // 8, N]`, row k in nibble k % 8 (bits 4*(k%8)..+3) of word k // 8 (GPTQ's layout)
             bits=8: int8 `[K, N]` holding u - 128 (the byte u ^ 0x80): signed, so XLA's int8 x int8 dots
             read the stored matrix as is (GGUF Q8_0's own bytes; `u = stored + 128`)
  scales     `[K // group_size, N]` (f16 / bf16 / f32, kept as the checkpoint has them)
  offsets    optional `[K // group_size, N]`; W = u * scale + offset.  None means symmetric:
             offset = -2**(bits-1) * scale.  Integer zero points z fold to offset = -z * scale, stored in f32
             (exact); GGUF Q4_1's f16 minimum is an offset as is (kept f16), which a (u - z) * s form could
             not represent.
  perm       optional int32 `[K]` (GPTQ act-order): the stored rows are W[perm], so y = x[:, perm] @ stored.

`QuantLayout` is the packing without the data (bits, group size, which optional arrays exist, their
dtypes): what the model declares for a packed parameter so that Flax checks the loaded leaves' shapes.
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

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + offsets (+ the act-order permutation)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(self))


@dataclasses.dataclass(frozen=True)
class QuantLayout:
    """The static description of a QuantizedWeight: enough to build its abstract leaves for a given shape."""
    bits: int
    group_size: int
    scale_dtype: str
    offset_dtype: Optional[str]  # None: symmetric (no offsets array)
    has_perm: bool

    @property
    def has_offsets(self) -> bool:
        return self.offset_dtype is not None

    @classmethod
    def of(cls, w: "QuantizedWeight") -> "QuantLayout":
        return cls(w.bits, w.group_size, jnp.dtype(w.scales.dtype).name,
                   None if w.offsets is None else jnp.dtype(w.offsets.dtype).name, w.perm is not None)

    def zeros(self, shape) -> "QuantizedWeight":
        """A QuantizedWeight of logical shape [K, N] with zero leaves (Flax's parameter init for a packed leaf)."""
        k, n = shape
        groups = k // self.group_size
        qweight = jnp.zeros((k // 8, n), jnp.int32) if self.bits == 4 else jnp.zeros((k, n), jnp.int8)
        return QuantizedWeight(
            qweight=qweight, scales=jnp.zeros((groups, n), self.scale_dtype),
            offsets=jnp.zeros((groups, n), self.offset_dtype) if self.has_offsets else None,
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
    """Inverse of `pack_int4` (numpy): int32 `[K // 8, N]` -> uint8 `[K, N]`."""
    w = np.asarray(words).view(np.uint32)
    codes = np.stack([(w >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=1)
    return codes.reshape(-1, w.shape[1]).astype(np.uint8)


def pack_int8(codes):
    """uint codes `[K, N]` (values < 256) -> int8 `[K, N]` holding u - 128."""
    return (np.asarray(codes, np.int16) - 128).astype(np.int8)


def make_quantized(codes, scales, offsets, bits, group_size, perm=None) -> QuantizedWeight:
    """A QuantizedWeight with host (numpy) leaves from unsigned codes `[K, N]`: the loaders place it on device.
    Offsets keep a 16-bit float dtype when given in one (GGUF's f16 minimum, exact); otherwise f32."""
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits} (supported: 4, 8)")
    codes = np.asarray(codes)
    k, n = codes.shape
    if bits == 4 and k % 8:
        raise ValueError(f"4-bit weights need an input dim divisible by 8, got {k}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dim {k}")
    scales = np.asarray(scales)
    if scales.shape != (k // group_size, n):
        raise ValueError(f"scales have shape {scales.shape}, expected {(k // group_size, n)}")
    if offsets is not None:
        offsets = np.asarray(offsets)
        if offsets.dtype not in (np.float16, np.float32) and str(offsets.dtype) != "bfloat16":
            offsets = offsets.astype(np.float32)
        if offsets.shape != scales.shape:
            raise ValueError(f"offsets have shape {offsets.shape}, expected {scales.shape}")
    return QuantizedWeight(qweight=pack_int4(codes) if bits == 4 else pack_int8(codes), scales=scales,
                           offsets=offsets, perm=None if perm is None else np.asarray(perm, np.int32),
                           bits=bits, group_size=int(group_size))


def unpack_codes(qweight, bits: int, dtype=jnp.int32):
    """The unsigned codes u `[K, N]` of a packed weight, in jnp (works under jit, on any device). 4-bit: eight
    static shifts stacked on a new axis (a broadcast shift vector is several times slower on XLA CPU)."""
    if bits == 4:
        w = qweight.astype(jnp.int32)
        u = jnp.stack([(w >> (4 * j)) & 0xF for j in range(8)], axis=1)
        return u.reshape(-1, qweight.shape[-1]).astype(dtype)
    return (qweight.astype(jnp.int32) + 128).astype(dtype)


def codes(w: QuantizedWeight):
    return unpack_codes(w.qweight, w.bits)


def _scaled(u, scales, offsets, bits: int):
    """u * s + b per group, with u `[..., G, gs, N]`-shaped against s/b `[..., G, 1, N]`; symmetric weights as
    (u - 2**(bits-1)) * s, the product the source formats define (GGUF Q8_0 / Q4_0: d * q), so a float
    expansion matches theirs bit for bit."""
    s = scales.astype(jnp.float32)
    if offsets is None:
        return (u - 2 ** (bits - 1)).astype(jnp.float32) * s
    return u.astype(jnp.float32) * s + offsets.astype(jnp.float32)


def dequantize(w: QuantizedWeight, dtype=jnp.float32, *, unpermute: bool = True):
    """The float `[K, N]` weight (computed in f32, returned in `dtype`), in the original row order unless
    `unpermute=False` (then rows are in stored order, W[perm], for an x whose columns were permuted)."""
    K, N = w.shape
    G = K // w.group_size
    u = codes(w).reshape(G, w.group_size, N)
    offsets = None if w.offsets is None else w.offsets[:, None]
    dense = _scaled(u, w.scales[:, None], offsets, w.bits).reshape(K, N).astype(dtype)
    if w.perm is not None and unpermute:
        dense = jnp.zeros_like(dense).at[w.perm].set(dense)
    return dense


def dequantize_columns(w: QuantizedWeight, ids, dtype=jnp.float32):
    """`dequantize(w)[:, ids].T` -> `[len(ids), K]` without expanding the matrix: gathers the ids' columns of the
    codes, scales and offsets, then dequantizes only those (a tied embedding's token lookup)."""
    K, N = w.shape
    T, G = ids.shape[0], K // w.group_size
    take = lambda a: jnp.take(a, ids, axis=1).T  # [T, rows]
    words = take(w.qweight)  # [T, K // 8] or [T, K]: unpacked along the last axis, no transposes
    if w.bits == 4:
        u = jnp.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(T, K)
    else:
        u = words.astype(jnp.int32) + 128
    offsets = None if w.offsets is None else take(w.offsets)[:, :, None]
    rows = _scaled(u.reshape(T, G, w.group_size), take(w.scales)[:, :, None], offsets, w.bits).reshape(T, K)
    if w.perm is not None:
        rows = jnp.zeros_like(rows).at[:, w.perm].set(rows)
    return rows.astype(dtype)


def permute_columns(w: QuantizedWeight, order) -> QuantizedWeight:
    """W[:, order] of a packed weight (host-side, at load): columns of codes, scales and offsets move together."""
    take = lambda a: None if a is None else np.ascontiguousarray(np.asarray(a)[:, order])
    return dataclasses.replace(w, qweight=take(w.qweight), scales=take(w.scales), offsets=take(w.offsets))


# One compiled expansion per weight shape, instead of a dozen op-by-op dispatches (and their compiles) per weight.
_dequantize_jit = jax.jit(dequantize, static_argnames=("dtype", "unpermute"))


def dequantize_params(params, dtype, head_dtype=None, head_keys=("embed", "lm_head")):
    """The weight pytree with every QuantizedWeight expanded to float (`head_dtype` for the embedding / LM head)."""
    def walk(node, key):
        if isinstance(node, QuantizedWeight):
            return _dequantize_jit(node, head_dtype if head_dtype is not None and key in head_keys else dtype)
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        return node

    return walk(params, None)


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
