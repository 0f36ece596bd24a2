"""Packing float or checkpoint-format weights into `QuantizedWeight` (numpy, once at load time): round-to-nearest
quantization, and repackers from GPTQ, AWQ and GGUF Q4_0 / Q4_1 / Q8_0 blocks."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxinfer.quantization.weight import QuantizedWeight, make_quantized


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
    return make_quantized(codes.reshape(K, N).astype(np.uint8), scale, offsets, bits, gs)


# -------------------------------------------------------------------- repackers from checkpoint formats


def _unpack_words(words, bits, axis):
    """Unpack `32 // bits` fields per int32, lowest bits first, along `axis` of `words`."""
    w = np.asarray(words).view(np.uint32)
    pf, mask = 32 // bits, np.uint32(2 ** bits - 1)
    fields = np.stack([(w >> np.uint32(bits * j)) & mask for j in range(pf)], axis=axis + 1)
    shape = list(w.shape)
    shape[axis] *= pf
    return fields.reshape(shape).astype(np.int32)


GPTQ_FORMATS = ("gptq", "gptq_v2")


def from_gptq(qweight, qzeros, scales, g_idx=None, *, bits=4, group_size=128, checkpoint_format="gptq"):
    """GPTQ: qweight int32 `[K*bits/32, N]` packed along K, qzeros int32 `[G, N*bits/32]` packed along N, scales
    `[G, N]`, optional act-order g_idx `[K]`. checkpoint_format "gptq" (AutoGPTQ / exllama v1) stores each zero
    point minus one, "gptq_v2" (GPTQModel) stores it as is. Act-order is resolved by sorting K rows by group and
    storing the permutation (applied to x's columns)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"unsupported GPTQ checkpoint_format {checkpoint_format!r} (supported: {GPTQ_FORMATS})")
    if bits not in (4, 8):
        raise ValueError(f"unsupported GPTQ bits={bits} (supported: 4, 8)")
    codes = _unpack_words(qweight, bits, axis=0)
    K, N = codes.shape
    zeros = _unpack_words(qzeros, bits, axis=1)
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1; a stored 2**bits - 1 (zero 0 wrapped) decodes to 2**bits, as GPTQ
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
    return make_quantized(codes, scales, offsets, bits, gs, perm)


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
    gs = codes.shape[0] if group_size in (None, -1) else group_size
    offsets = -zeros.astype(np.float32) * scales.astype(np.float32)
    return make_quantized(codes, scales, offsets, 4, gs)


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
    if name == "Q8_0":  # int8 q with W = d * q: our 8-bit storage (u - 128) is q itself, symmetric
        q = blocks[..., 2:34].reshape(N, -1).view(np.int8).T  # [K, N]
        return QuantizedWeight(qweight=np.ascontiguousarray(q), scales=np.ascontiguousarray(d.T), offsets=None,
                               perm=None, bits=8, group_size=32)
    qs = blocks[..., 4:20] if name == "Q4_1" else blocks[..., 2:18]
    # element j < 16: low nibble of byte j; element j >= 16: high nibble of byte j - 16
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(N, -1).T  # [K, N]
    # Q4_0: W = d * (u - 8), the symmetric default. Q4_1: W = d * u + m, its f16 minimum kept as stored (exact)
    offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0].T if name == "Q4_1" else None
    return make_quantized(codes, d.T, offsets, 4, 32)
