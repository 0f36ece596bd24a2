"""`y = x @ W` for a packed weight in plain XLA: the path wherever the Pallas kernel does not run (CPU first).

XLA CPU never fuses a weight's conversion into its dot: `dot(x, convert(w))` writes the whole converted matrix
first. So each formulation below is a different trade between bytes written per call and arithmetic, and which
one is fastest depends on the CPU, the packing and the row count M. `jaxinfer.cpu_probe.choose_quant_matmul`
times them at the model's own shapes on this machine and hands the model a `QuantMatmulPlan` (formulation per
row count); `benchmarks/quant_matmul_cpu.py` prints the full table.

  dequantize      W rebuilt in x's float dtype every call, then a float dot. Any packing; the reference path.
  int8_dot        activations quantized to int8 per row (absmax), one int8 x int8 -> int32 dot with the
                  int8 codes (4-bit ones unpacked to int8 on the way), scales applied to the int32 result.
                  Only for one scale per output column (per-channel: group_size == K).
  group_int8_dot  llama.cpp's scheme: activations quantized to int8 per row and group, one int32 partial dot
                  per group (a batched dot over groups), then the group scales (and offsets) applied to those
                  partials. Any group size.
  cpu_kernel      not XLA: jaxinfer's native CPU kernel (jaxinfer.native.quant_matmul_cpu) as a custom call,
                  codes converted to f32 in registers, f32 activations (exact, like `dequantize`). Where it is
                  built (x86-64 with AVX2 + FMA + F16C and a C++ compiler).

On XLA CPU every formulation runs under `cpu_compiler_options()`: YNNPACK's dot fusion, which takes the
dequantization (int8 -> float convert, scale, offset) into the dot's own tiles instead of writing the float
matrix first, and still hands int8 x int8 dots to YNNPACK. (4-bit codes are unpacked to int8 by XLA first: YNNPACK
fusions take no shifts.)

Codes enter the int8 dots signed, c = u - 2**(bits-1), so that a symmetric weight needs no offset term: with
b' = offset + 2**(bits-1) * scale, W = c * scale + b' and x @ W = (x @ c) * scale + rowsum(x) * b'.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from jaxinfer.quantization.weight import QuantizedWeight, QuantLayout, unpack_codes

FORMULATIONS = ("dequantize", "int8_dot", "group_int8_dot", "cpu_kernel")
# These quantize the activations too (W8A8), so their outputs differ from the weight-only model's: per-row int8
# activations raised SmolLM2-135M's WikiText-2 NLL by 1.1% over the exact int8 weights (docs/QUANTIZATION.md).
# The engine picks them only with matmul_backend="xla_w8a8".
ACTIVATION_QUANTIZING = ("int8_dot", "group_int8_dot")
_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"


@functools.cache
def cpu_compiler_options() -> tuple:
    """XLA options a packed model's step is compiled with on CPU, as ((key, value), ...): YNNPACK dot fusion where
    this jaxlib has it (detected by compiling a tiny dot with it), otherwise none."""
    import jax

    options = {"xla_cpu_experimental_ynn_fusion_type": _YNN_FUSIONS}
    try:
        x = jax.ShapeDtypeStruct((2, 8), jnp.float32)
        jax.jit(lambda a: a @ a.T).trace(x).lower(lowering_platforms=("cpu",)).compile(options)
    except Exception:  # an XLA without the option (or without YNNPACK): plain XLA fusions
        return ()
    return tuple(options.items())


def applicable(formulation: str, layout: QuantLayout, k: int) -> bool:
    """Whether `formulation` computes x @ W exactly as specified for weights of this packing and input dim."""
    if formulation == "dequantize":
        return True
    if formulation == "int8_dot":
        return layout.group_size == k
    if formulation == "group_int8_dot":
        return layout.group_size < k
    if formulation == "cpu_kernel":
        from jaxinfer.native import quant_matmul_cpu

        return quant_matmul_cpu.supports(layout.bits, layout.group_size, 16) and quant_matmul_cpu.available()
    raise ValueError(f"unknown quantized matmul formulation {formulation!r} (known: {FORMULATIONS})")


@dataclasses.dataclass(frozen=True)
class QuantMatmulPlan:
    """Which formulation each packed matmul uses, by row count: `by_rows` holds (max_rows, formulation) pairs in
    increasing max_rows; rows above the last bound use the last entry. Per-channel weights (where `int8_dot`
    applies) and grouped ones get separate tables. Hashable: the model keeps it as a static attribute."""
    grouped: tuple = ((2**31, "dequantize"),)
    per_channel: tuple = ((2**31, "dequantize"),)

    def pick(self, rows: int, layout: QuantLayout, k: int) -> str:
        table = self.per_channel if layout.group_size == k else self.grouped
        name = next((f for bound, f in table if rows <= bound), table[-1][1])
        return name if applicable(name, layout, k) else "dequantize"

    def exact(self) -> "QuantMatmulPlan":
        """This plan with the activation-quantizing formulations replaced by `dequantize` (for the LM head)."""
        keep = lambda t: tuple((b, "dequantize" if f in ACTIVATION_QUANTIZING else f) for b, f in t)
        return QuantMatmulPlan(keep(self.grouped), keep(self.per_channel))

    def uses(self, formulation: str) -> bool:
        return any(f == formulation for _, f in self.grouped + self.per_channel)

    def always(self, formulation: str, layout: QuantLayout, k: int) -> bool:
        """Whether a weight of this packing runs `formulation` at every row count."""
        table = self.per_channel if layout.group_size == k else self.grouped
        return all(self.pick(bound, layout, k) == formulation for bound, _ in table)

    def describe(self) -> str:
        show = lambda t: ", ".join(f"<= {b} rows: {f}" if b < 2**31 else f"above: {f}" for b, f in t)
        return f"grouped weights [{show(self.grouped)}]; per-channel weights [{show(self.per_channel)}]"


def xla_quant_matmul(x, w: QuantizedWeight, formulation: str = "dequantize"):
    """x `[..., K]` @ W `[K, N]` -> `[..., N]` in x's dtype, f32 accumulation."""
    K, N = w.shape
    lead = x.shape[:-1]
    # Tie the weight to x: otherwise XLA is free to start every layer's weight expansion at once (none depends
    # on activations), holding every expanded matrix in memory together and running them while the previous
    # layers still compute.
    x2 = x.reshape(-1, K)
    if w.perm is not None:  # act-order: the stored rows are W[perm]
        x2 = jnp.take(x2, w.perm, axis=1)
    if formulation == "dequantize":
        y = jnp.dot(x2, _dequantize_signed(w, x.dtype), preferred_element_type=jnp.float32)
    elif formulation == "int8_dot":
        y = _int8_dot(x2.astype(jnp.float32), w)
    elif formulation == "group_int8_dot":
        y = _group_int8_dot(x2.astype(jnp.float32), w)
    elif formulation == "cpu_kernel":
        from jaxinfer.native import quant_matmul_cpu

        if quant_matmul_cpu.supports(w.bits, w.group_size, N):
            y = quant_matmul_cpu.quant_matmul(x2, w)
        else:  # an output dim outside the kernel's 16-column strips
            y = jnp.dot(x2, _dequantize_signed(w, x.dtype), preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"unknown quantized matmul formulation {formulation!r} (known: {FORMULATIONS})")
    return y.astype(x.dtype).reshape(*lead, N)


def signed_codes(w: QuantizedWeight):
    """c = u - 2**(bits-1) as int8 `[K, N]` (for 8-bit weights this is the stored matrix itself)."""
    if w.bits == 8:
        return w.qweight.astype(jnp.int8)
    return (unpack_codes(w.qweight, 4) - 8).astype(jnp.int8)


def _dequantize_signed(w: QuantizedWeight, dtype):
    """W in stored row order from int8 codes: convert, scale, offset (ops a library dot fusion can absorb, e.g.
    XLA CPU's YNNPACK dot fusion; integer arithmetic on the codes would keep it out)."""
    K, N = w.shape
    G = K // w.group_size
    dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    c = signed_codes(w).astype(dtype).reshape(G, w.group_size, N)
    dense = c * w.scales.astype(dtype)[:, None]
    b = _offset_term(w)
    if b is not None:
        dense = dense + b.astype(dtype)[:, None]
    return dense.reshape(K, N)


def _offset_term(w: QuantizedWeight):
    """b' `[G, N]` (see the module docstring), or None for a symmetric weight."""
    if w.offsets is None:
        return None
    return w.offsets.astype(jnp.float32) + 2.0 ** (w.bits - 1) * w.scales.astype(jnp.float32)


def _quantize_rows(x, axis=-1):
    """Symmetric int8 quantization of x along `axis`: (codes int8, scale f32 with that axis kept as 1)."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(x / scale).astype(jnp.int8), scale


def _int8_dot(x, w: QuantizedWeight):
    xq, sx = _quantize_rows(x)
    acc = jnp.dot(xq, signed_codes(w), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (sx * w.scales.astype(jnp.float32)[0])
    b = _offset_term(w)
    return y if b is None else y + jnp.sum(x, axis=1, keepdims=True) * b[0]


def _group_int8_dot(x, w: QuantizedWeight):
    K, N = w.shape
    M, G, gs = x.shape[0], K // w.group_size, w.group_size
    xg = x.reshape(M, G, gs)
    xq, sx = _quantize_rows(xg)  # per row and group: sx [M, G, 1]
    acc = jnp.einsum("gmk,gkn->gmn", xq.transpose(1, 0, 2), signed_codes(w).reshape(G, gs, N),
                     preferred_element_type=jnp.int32)  # [G, M, N]
    scale = sx[:, :, 0].T[:, :, None] * w.scales.astype(jnp.float32)[:, None, :]  # [G, M, N]
    y = jnp.sum(acc.astype(jnp.float32) * scale, axis=0)
    b = _offset_term(w)
    return y if b is None else y + jnp.dot(jnp.sum(xg, axis=2), b)
