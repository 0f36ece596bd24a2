"""What loading does with each weight, by `quantization` (an EngineArgs field, so also `--quantization`):

  None          keep what the checkpoint stores: packed tensors (GGUF Q4_0 / Q4_1 / Q8_0, GPTQ, AWQ) stay packed,
                float ones are cast to the weight dtype. (The engine's default on CPU first measures whether
                the packed path is faster here than float weights: `jaxinfer.cpu_probe.choose_quant_matmul`.)
  "packed"      the same, and the engine never expands packed weights to float
  "dequantize"  packed tensors are expanded to float as well (bit-exact to the format's own dequantization)
  "int8"        every layer weight quantized to int8 per output channel, symmetric, round to nearest
  "int4"        every layer weight quantized to 4 bits in groups of 128 along the input dim, with a float
                minimum per group, round to nearest; "int4-g64" / "int4-g32" choose another group size

Quantize-on-load applies to layer weights (`Kind.LINEAR`); the embedding and LM head keep their stored form
(their precision decides close calls between top tokens). A packed checkpoint quantized again is dequantized
first.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxinfer.params import Kind, ParamSpec
from jaxinfer.quantization.packers import quantize
from jaxinfer.quantization.weight import QuantizedWeight, dequantize

MODES = (None, "packed", "dequantize", "int8", "int4")
INT4_DEFAULT_GROUP = 128


def check_mode(mode: str | None) -> str | None:
    if mode in MODES or (isinstance(mode, str) and re.fullmatch(r"int4-g\d+", mode)):
        return mode
    raise ValueError(f"unknown quantization {mode!r}: expected one of {[m for m in MODES if m]}, "
                     "'int4-g<group size>', or None (keep the checkpoint's own packing)")


def quantize_arguments(mode: str, k: int, name: str) -> dict:
    """quantize() arguments for a quantize-on-load mode and a weight of input dim k (named in errors)."""
    if mode == "int8":
        return dict(bits=8, group_size=None, symmetric=True)
    group = int(mode.split("-g")[1]) if "-g" in mode else INT4_DEFAULT_GROUP
    if group <= 0 or group % 8 or k % group:
        raise ValueError(f"quantization={mode!r}: group size {group} does not divide {name}'s input dim {k} "
                         "(or is not a multiple of 8); choose e.g. 'int4-g64' or 'int4-g32'")
    return dict(bits=4, group_size=group, symmetric=False)


def convert(spec: ParamSpec, value, dtype, mode: str | None):
    """One fetched weight -> what the model holds: a host array in `dtype` (jaxinfer's layout) or a
    QuantizedWeight. `value` is an HF-layout array or a QuantizedWeight (already in jaxinfer's layout)."""
    requantize = mode not in (None, "packed", "dequantize") and spec.kind == Kind.LINEAR
    if isinstance(value, QuantizedWeight):  # packed as [in, out] = the HF tensor transposed
        keep = mode in (None, "packed") or (not requantize and mode != "dequantize")
        if keep and spec.hf_transposed:
            return value
        value = np.asarray(dequantize(value))
        value = value if spec.hf_transposed else value.T  # an untied embedding is looked up by rows: float
    else:
        value = value.T if spec.hf_transposed else value
    if requantize:
        return quantize(np.asarray(value, np.float32), **quantize_arguments(mode, value.shape[0], spec.key),
                        scale_dtype=jnp.float32)
    return np.asarray(value, np.float32).astype(jnp.dtype(dtype), order="C")  # C order: placement slices it


def convert_built(params, config, dtype, head_dtype, mode: str | None):
    """`convert` for a pytree that is already in jaxinfer's layout (an orbax checkpoint): only "dequantize",
    "int8" and "int4" change anything."""
    if mode in (None, "packed"):
        return params
    from jaxinfer.params import iter_leaves, model_specs, set_leaf

    head_dtype = head_dtype or dtype
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for spec, value in iter_leaves(params, model_specs(config)):
        if not isinstance(value, QuantizedWeight):
            value = np.asarray(value)
            value = value.T if spec.hf_transposed else value  # back to the fetched (HF) layout
        elif not spec.hf_transposed:  # a packed [out, in] leaf (not one our loaders make): float, HF layout
            value = np.asarray(dequantize(value))
        new = convert(spec, value, head_dtype if spec.kind == Kind.HEAD else dtype, mode)
        set_leaf(out, spec, jnp.asarray(new) if not isinstance(new, QuantizedWeight)
                 else QuantizedWeight(*(None if a is None else jnp.asarray(a)
                                        for a in (new.qweight, new.scales, new.offsets, new.perm)),
                                      new.bits, new.group_size))
    return out
