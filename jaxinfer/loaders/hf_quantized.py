"""HF-format GPTQ and AWQ checkpoints (`config.json` with a `quantization_config`), kept packed.

A quantized linear `model.layers.N.self_attn.q_proj` stores `.qweight`, `.qzeros`, `.scales` (and GPTQ's act-order
`.g_idx`) instead of `.weight`; `packed_getter` assembles them into a `QuantizedWeight` when the loader asks for
`....q_proj.weight`, checking every tensor's shape against the others (the error names the tensor), and passes
every other tensor through. Settings outside what we run are refused by `parse_quantization_config`, naming them.

  GPTQ  quant_method "gptq": bits 4 or 8, group_size -1 (per channel) or one dividing the input dim, sym or not,
        desc_act with g_idx, checkpoint_format "gptq" (AutoGPTQ: zero points stored minus one) or "gptq_v2".
        qweight int32 [K * bits / 32, N] packed along K (row k in field k % (32 / bits), lowest bits first),
        qzeros int32 [G, N * bits / 32] packed along N the same way, scales [G, N], g_idx int32 [K].
  AWQ   quant_method "awq", version "gemm", 4 bits, zero_point: qweight int32 [K, N / 8] and qzeros [G, N / 8]
        packed along N in AWQ's interleaved order (column 8j + (0, 2, 4, 6, 1, 3, 5, 7)[i] in nibble i of word
        j), scales [G, N].
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxinfer.loaders.common import CheckpointError
from jaxinfer.quantization.packers import GPTQ_FORMATS, from_awq, from_gptq


@dataclasses.dataclass(frozen=True)
class HFQuantConfig:
    method: str               # "gptq" | "awq"
    bits: int
    group_size: int           # -1: one group per output channel
    checkpoint_format: str = "gptq"

    def groups(self, k: int, name: str) -> int:
        if self.group_size == -1:
            return 1
        if self.group_size <= 0 or k % self.group_size:
            raise CheckpointError(f"{self.method.upper()} group_size {self.group_size} does not divide the input "
                                  f"dim {k} of {name}")
        return k // self.group_size


def parse_quantization_config(hf_config: dict) -> HFQuantConfig | None:
    """The checkpoint's quantization settings, or None for a float checkpoint; refuses what we cannot run."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    bits, group_size = q.get("bits"), q.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"unsupported {method} group_size {group_size!r} (expected -1 or a positive integer)")
    if method == "gptq":
        if bits not in (4, 8):
            raise CheckpointError(f"unsupported GPTQ bits={bits} (supported: 4, 8)")
        fmt = q.get("checkpoint_format") or "gptq"
        if fmt not in GPTQ_FORMATS:
            raise CheckpointError(f"unsupported GPTQ checkpoint_format {fmt!r} (supported: {', '.join(GPTQ_FORMATS)})")
        return HFQuantConfig("gptq", bits, group_size, fmt)
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"unsupported AWQ version {version!r} (supported: gemm)")
        if bits != 4:
            raise CheckpointError(f"unsupported AWQ bits={bits} (supported: 4)")
        if not q.get("zero_point", True):
            raise CheckpointError("unsupported AWQ zero_point=false (supported: true)")
        return HFQuantConfig("awq", 4, group_size)
    raise CheckpointError(f"unsupported quantization_config quant_method {method!r} (supported: gptq, awq)")


def packed_getter(get: Callable[[str], np.ndarray], has: Callable[[str], bool], q: HFQuantConfig):
    """`get(hf_name)` that returns a QuantizedWeight for every `X.weight` stored as `X.qweight` & co."""

    def packed_get(hf_name: str):
        prefix = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
        if prefix is None or not has(prefix + ".qweight"):
            return get(hf_name)
        tensors = {part: np.asarray(get(f"{prefix}.{part}")) for part in ("qweight", "qzeros", "scales")
                   if _require(has, prefix, part)}
        if q.method == "gptq" and has(prefix + ".g_idx"):
            tensors["g_idx"] = np.asarray(get(prefix + ".g_idx"))
        return _assemble(prefix, tensors, q)

    return packed_get


def _require(has, prefix: str, part: str) -> bool:
    if not has(f"{prefix}.{part}"):
        raise CheckpointError(f"checkpoint has {prefix}.qweight but is missing {prefix}.{part}")
    return True


def _assemble(prefix: str, t: dict, q: HFQuantConfig):
    per_word = 32 // q.bits
    for part, arr in t.items():
        if arr.dtype not in (np.int32, np.uint32) and part in ("qweight", "qzeros"):
            raise CheckpointError(f"{prefix}.{part} has dtype {arr.dtype}, expected int32")
        if arr.ndim != (1 if part == "g_idx" else 2):
            raise CheckpointError(f"{prefix}.{part} has shape {arr.shape}: expected "
                                  f"{'1' if part == 'g_idx' else '2'} dimensions")
    rows, cols = t["qweight"].shape
    k, n = (rows * per_word, cols) if q.method == "gptq" else (rows, cols * per_word)
    g = q.groups(k, f"{prefix} (qweight {t['qweight'].shape})")
    want = {"scales": (g, n), "qzeros": (g, n // per_word)}
    if q.method == "gptq":
        want["g_idx"] = (k,)
    for part, shape in want.items():
        if part in t and tuple(t[part].shape) != shape:
            raise CheckpointError(f"{prefix}.{part} has shape {tuple(t[part].shape)}, expected {shape} for "
                                  f"qweight {t['qweight'].shape} ({q.method.upper()} {q.bits}-bit, "
                                  f"group_size {q.group_size})")
    gs = k // g
    try:
        if q.method == "gptq":
            g_idx = t.get("g_idx")
            return from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, bits=q.bits, group_size=gs,
                             checkpoint_format=q.checkpoint_format)
        return from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=gs)
    except ValueError as e:  # e.g. g_idx groups that are not all group_size long
        raise CheckpointError(f"{prefix}: {e}") from None
