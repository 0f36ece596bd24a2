"""How a loaded model's packed weights run on this backend (the engine calls this once, after loading):

  GPU         the Pallas kernel (`matmul_backend="pallas"`), packed weights as loaded.
  CPU         an XLA formulation per row count (`QuantMatmulPlan`), compiled with `cpu_compiler_options()`.
              With `quantization=None` the probe (`jaxinfer.cpu_probe.choose_quant_matmul`) decides on this
              machine whether the layer weights run packed as loaded, re-quantized to int8 per channel, or
              expanded to float, whichever is fastest in that order of preference; "packed" keeps them as loaded.
              A packed embedding / LM head stays packed where the native kernel (jaxinfer.native) keeps up
              with the float dot (`cpu_probe.keep_head_packed`), and
              is expanded to the head dtype otherwise: no XLA formulation of the [hidden, vocab] head comes
              near the float dot on CPU (benchmarks/quant_matmul_cpu.py: at one row, 576x49152, f32 23 ms
              against 320-740 ms for the int8 and dequantizing ones). "packed" keeps it packed regardless.
  other       XLA's "dequantize" formulation, packed weights as loaded.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.params import Kind, iter_leaves, model_specs, set_leaf
from jaxinfer.quantization.packers import quantize
from jaxinfer.quantization.weight import QuantizedWeight, QuantLayout, dequantize, dequantize_params, packing_of
from jaxinfer.quantization.xla_matmul import QuantMatmulPlan, cpu_compiler_options


@dataclasses.dataclass(frozen=True)
class PackedRuntime:
    params: object
    matmul_backend: str
    plan: QuantMatmulPlan | None = None
    compiler_options: dict | None = None  # for the model step's jit
    note: str | None = None               # what was decided, for the log


def default_matmul_backend(backend: str) -> str:
    return "pallas" if backend == "gpu" else "xla"


def prepare_packed_weights(config, params, *, backend: str, quantization: str | None, matmul_backend: str | None,
                           float_dtype, head_dtype, probe: bool = True) -> PackedRuntime:
    """How `params` run here (see the module docstring). probe=False: no per-machine measurement (processes of
    a multi-process run must compile the same program): packed weights as loaded, XLA "dequantize"."""
    matmul_backend = matmul_backend or default_matmul_backend(backend)
    w8a8 = matmul_backend == "xla_w8a8"  # XLA, and formulations that quantize activations may be chosen
    matmul_backend = "xla" if w8a8 else matmul_backend
    packing = packing_of(params)
    if not packing or matmul_backend != "xla":
        return PackedRuntime(params, matmul_backend)
    if backend != "cpu" or not probe:
        return PackedRuntime(params, matmul_backend, QuantMatmulPlan())
    options = dict(cpu_compiler_options())
    if quantization not in (None, "packed"):  # the user chose the packing (int8 / int4): run it as loaded
        from jaxinfer.cpu_probe import choose_quant_matmul

        choice = choose_quant_matmul(config, packing, jnp.dtype(float_dtype).name, w8a8=w8a8)
        return PackedRuntime(params, matmul_backend, choice.plan, options,
                             f"matmul formulations for the packed weights: {choice.plan.describe()}")
    from jaxinfer.cpu_probe import choose_quant_matmul

    choice = choose_quant_matmul(config, packing, jnp.dtype(float_dtype).name, w8a8=w8a8)  # layer weights
    head_note = ""
    if quantization is None:
        kernel_plan = choice.plan if choice.action == "packed" and choice.plan.uses("cpu_kernel") else None
        params, expanded, kept = expand_heads(config, params, head_dtype, kernel_plan)
        packing = packing_of(params)
        head_note = f"{' and '.join(expanded)} expanded to {jnp.dtype(head_dtype).name}; " if expanded else ""
        head_note += f"{' and '.join(kept)} kept packed ({kept[next(iter(kept))]}); " if kept else ""
        if not packing:
            return PackedRuntime(params, matmul_backend, None, None, head_note.rstrip("; "))
    why = f"{choice.reason}{' (cached measurement)' if choice.cached else ''}"
    action = "packed" if quantization == "packed" else choice.action
    if action == "float":
        return PackedRuntime(dequantize_params(params, float_dtype, head_dtype), matmul_backend, None, None,
                             f"{head_note}packed weights expanded to {jnp.dtype(float_dtype).name}: {why}; "
                             "quantization='packed' keeps them packed")
    if action == "int8":
        params = transcode_int8(config, params)
        choice = choose_quant_matmul(config, packing_of(params), jnp.dtype(float_dtype).name,
                                     w8a8=w8a8)
        return PackedRuntime(params, matmul_backend, choice.plan, options,
                             f"{head_note}layer weights re-quantized to int8 per channel: {why}; quantization='packed' "
                             f"keeps the checkpoint's packing; matmul formulations: {choice.plan.describe()}")
    return PackedRuntime(params, matmul_backend, choice.plan, options,
                         f"{head_note}packed weights kept packed: {why}; matmul formulations: {choice.plan.describe()}")


def expand_heads(config, params, head_dtype, plan: QuantMatmulPlan | None = None):
    """(params with every packed embedding / LM head expanded to `head_dtype`, the keys expanded, {key kept
    packed: why}). With a `plan` that runs such a head through the native kernel at every row count, the head
    stays packed where the kernel runs it about as fast as a `head_dtype` one on this CPU
    (`cpu_probe.keep_head_packed`)."""
    from jaxinfer.cpu_probe import keep_head_packed

    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    expanded, kept = [], {}
    for spec, value in iter_leaves(params, model_specs(config)):
        if spec.kind == Kind.HEAD and isinstance(value, QuantizedWeight):
            layout = QuantLayout.of(value)
            if plan is not None and plan.exact().always("cpu_kernel", layout, value.shape[0]):
                keep, why = keep_head_packed(config, layout, jnp.dtype(head_dtype).name)
                if keep:
                    kept[spec.key] = why
                    continue
            set_leaf(out, spec, dequantize(value, head_dtype))
            expanded.append(spec.key)
    return out, expanded, kept


def transcode_int8(config, params):
    """Every packed layer weight re-quantized to int8 per output channel (symmetric, round to nearest) from its
    exact float expansion; the embedding / LM head keep their packing."""
    out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    for spec, value in iter_leaves(params, model_specs(config)):
        if spec.kind == Kind.LINEAR and isinstance(value, QuantizedWeight):
            w = quantize(np.asarray(dequantize(value)), bits=8, group_size=None, symmetric=True,
                         scale_dtype=jnp.float32)
            set_leaf(out, spec, jax.tree.map(jnp.asarray, w))
    return out
