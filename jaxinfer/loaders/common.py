"""Shared loader plumbing: HF-named tensors -> jaxinfer weight pytree (see docs/ARCHITECTURE.md).

Every source format (safetensors, GGUF, ...) only has to provide `get(hf_name) -> np.ndarray` in HF layout
(linear weights `[out, in]`); this module transposes, casts and places them once, with progress. Where a tensor
goes is the caller's `place` hook: by default the default device; `ShardingPlan.place` sends each device only
its slice of the tensor.
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


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: its config (read cheaply) and how to load its weights, so a caller can choose
    dtypes (or, later, shardings) from the config before any tensor is read."""
    path: str
    config: ModelConfig
    load: Callable  # (dtype, head_dtype=None, place=None) -> weight pytree


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


def default_place(spec: ParamSpec, host: np.ndarray):
    """The whole tensor on the default device."""
    return jnp.asarray(host)


def build_params(config: ModelConfig, get: Callable[[str], np.ndarray], dtype, desc: str = "loading weights",
                 head_dtype=None, place: Callable | None = None):
    """Build the weight pytree from HF-named tensors, one declared parameter at a time (`jaxinfer.params`):
    fetch, check its shape, convert (transpose HF's [out, in] linear weights, cast on the host), place; shows
    progress. head_dtype (default: dtype) is for the embedding and LM head: the engine keeps them wider than
    bf16 layer weights on CPU. place(spec, host array) -> device value (default: `default_place`)."""
    head_dtype = head_dtype or dtype
    place = place or default_place
    params: dict = {}
    for spec in tqdm(model_specs(config), desc=desc, unit="tensor", disable=_quiet()):
        try:
            arr = np.asarray(get(spec.hf_name))
        except KeyError:
            raise CheckpointError(f"checkpoint is missing tensor {spec.hf_name!r}") from None
        if tuple(arr.shape) != spec.hf_shape:
            raise CheckpointError(f"tensor {spec.hf_name!r} has shape {tuple(arr.shape)}, config expects "
                                  f"{spec.hf_shape}")
        if spec.hf_transposed:
            arr = arr.T
        host = arr.astype(np.float32).astype(jnp.dtype(head_dtype if spec.kind == Kind.HEAD else dtype), order="C")
        set_leaf(params, spec, place(spec, host))
    return params


def params_nbytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def random_params(config: ModelConfig, dtype, seed: int = 0, scale: float = 0.02, head_dtype=None, place=None):
    """Random weights with a model's true shapes (benchmarks and planning without a checkpoint)."""
    rng = np.random.default_rng(seed)

    def get(name):
        shape = expected_shapes(config)[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * scale)

    return build_params(config, get, dtype, desc="random weights", head_dtype=head_dtype, place=place)


def _quiet() -> bool:
    return os.environ.get("JAXINFER_QUIET", "") == "1"
