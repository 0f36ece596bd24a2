"""Shared loader plumbing: HF-named tensors -> jaxinfer weight pytree (see docs/ARCHITECTURE.md).

Every source format (safetensors, GGUF, ...) only has to provide `get(hf_name)`: a float array in HF layout
(linear weights `[out, in]`) or a packed `QuantizedWeight`; this module checks, converts and places each one
once, with progress. Where a tensor goes is the caller's `place` hook: by default the default device;
`ShardingPlan.place` sends each device only its slice of the tensor (packed leaves included).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.params import Kind, ParamSpec, model_specs, set_leaf
from jaxinfer.quantization.on_load import check_mode, convert
from jaxinfer.quantization.weight import QuantizedWeight


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: its config (read cheaply) and how to load its weights, so a caller can choose
    dtypes (or, later, shardings) from the config before any tensor is read."""
    path: str
    config: ModelConfig
    load: Callable  # (dtype, head_dtype=None, quantization=None, place=None) -> weight pytree


def read_json(file: str) -> dict:
    """A JSON config file, with a CheckpointError naming the file when it is unreadable."""
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {file}: {e}") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for every tensor the model needs."""
    return {s.hf_name: s.hf_shape for s in model_specs(config)}


def build_params(config: ModelConfig, get: Callable[[str], object], dtype, desc: str = "loading weights",
                 head_dtype=None, quantization: str | None = None, place: Callable | None = None):
    """Build the weight pytree, one declared parameter at a time (`jaxinfer.params`): fetch, check, convert,
    place, with progress.

    `get(hf_name)` returns a float array in HF layout (linear weights `[out, in]`) or, for a packable parameter
    stored packed (GGUF Q4_0 / Q4_1 / Q8_0 blocks, GPTQ, AWQ), a `QuantizedWeight` already in jaxinfer's
    `[in, out]` layout. Shapes are checked against the declaration either way. Conversion follows
    `quantization` (`jaxinfer.quantization.on_load`): None keeps packed weights packed and float ones in
    `dtype` (`head_dtype`, default dtype, for the embedding and LM head); "dequantize" expands packed weights
    to float; "int8" / "int4" also quantize every float layer weight (round to nearest). `place(spec, value)`
    puts each converted value on device (default: the default device)."""
    check_mode(quantization)
    head_dtype = head_dtype or dtype
    place = place or default_place
    params: dict = {}
    for spec in tqdm(model_specs(config), desc=desc, unit="tensor", disable=_quiet()):
        value = _fetch(get, spec)
        _check_shape(spec, value)
        value = convert(spec, value, head_dtype if spec.kind == Kind.HEAD else dtype, quantization)
        set_leaf(params, spec, place(spec, value))
    return params


def _fetch(get, spec: ParamSpec):
    try:
        value = get(spec.hf_name)
    except KeyError:
        raise CheckpointError(f"checkpoint is missing tensor {spec.hf_name!r}") from None
    return value if isinstance(value, QuantizedWeight) else np.asarray(value)


def _check_shape(spec: ParamSpec, value) -> None:
    if isinstance(value, QuantizedWeight):  # packed along the HF tensor's input dim: [in, out]
        want = tuple(reversed(spec.hf_shape))
        if not spec.packable:
            raise CheckpointError(f"tensor {spec.hf_name!r} is packed, but {spec.key} cannot be")
        if tuple(value.shape) != want:
            raise CheckpointError(f"packed tensor {spec.hf_name!r} has logical shape [in, out] = "
                                  f"{tuple(value.shape)}, config expects {want}")
    elif tuple(value.shape) != spec.hf_shape:
        raise CheckpointError(f"tensor {spec.hf_name!r} has shape {tuple(value.shape)}, config expects "
                              f"{spec.hf_shape}")


def default_place(spec: ParamSpec, value):
    """The whole tensor (every leaf of a packed one) on the default device."""
    return jax.tree.map(jnp.asarray, value)


def params_nbytes(params) -> int:
    """Bytes the weights hold: every array, packed codes, scales and offsets of quantized weights included."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))


def random_params(config: ModelConfig, dtype, seed: int = 0, scale: float = 0.02, head_dtype=None,
                  quantization: str | None = None, place=None):
    """Random weights with a model's true shapes (benchmarks and planning without a checkpoint)."""
    rng = np.random.default_rng(seed)

    def get(name):
        shape = expected_shapes(config)[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * scale)

    return build_params(config, get, dtype, desc="random weights", head_dtype=head_dtype, quantization=quantization,
                        place=place)


def _quiet() -> bool:
    return os.environ.get("JAXINFER_QUIET", "") == "1"
