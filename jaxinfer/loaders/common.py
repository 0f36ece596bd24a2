"""Shared loader plumbing: HF-named tensors -> jaxinfer weight pytree (see docs/ARCHITECTURE.md).

Every source format (safetensors, GGUF, ...) only has to provide `get(hf_name) -> np.ndarray` in HF layout
(linear weights `[out, in]`); this module transposes, casts and places them once, with progress.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


_LAYER_LINEARS = {  # our name -> HF name (under model.layers.{i}.)
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}
_LAYER_BIASES = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}


def read_json(file: str) -> dict:
    """A JSON config file, with a CheckpointError naming the file when it is unreadable."""
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {file}: {e}") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for every tensor the model needs."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    per_layer = {
        "input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q, c.hidden_size), "self_attn.k_proj.weight": (kv, c.hidden_size),
        "self_attn.v_proj.weight": (kv, c.hidden_size), "self_attn.o_proj.weight": (c.hidden_size, q),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    if c.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
    for i in range(c.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return out


# Pytree names of the token embedding and LM head, which `head_dtype` applies to.
HEAD_PARAMS = ("embed", "lm_head")


def build_params(config: ModelConfig, get: Callable[[str], np.ndarray], dtype, desc: str = "loading weights",
                 head_dtype=None):
    """Build the weight pytree from HF-named tensors. Checks every shape; shows progress. head_dtype (default:
    dtype) is for the embedding and LM head: the engine keeps them wider than bf16 layer weights on CPU."""
    shapes = expected_shapes(config)
    head_dtype = head_dtype or dtype

    def fetch(name: str, transpose: bool = False, dtype=dtype):
        try:
            arr = np.asarray(get(name))
        except KeyError:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}") from None
        if tuple(arr.shape) != shapes[name]:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, config expects {shapes[name]}")
        if transpose:
            arr = arr.T
        return jnp.asarray(arr.astype(np.float32), dtype=dtype)

    params = {"final_norm": fetch("model.norm.weight")}
    if config.tie_word_embeddings:  # one [hidden, vocab] matrix serves both ends (model.py says why)
        params["lm_head"] = fetch("model.embed_tokens.weight", transpose=True, dtype=head_dtype)
    else:
        params["embed"] = fetch("model.embed_tokens.weight", dtype=head_dtype)
        params["lm_head"] = fetch("lm_head.weight", transpose=True, dtype=head_dtype)
    for i in tqdm(range(config.num_layers), desc=desc, unit="layer", disable=_quiet()):
        p = f"model.layers.{i}."
        layer = {"attn_norm": fetch(p + "input_layernorm.weight"),
                 "mlp_norm": fetch(p + "post_attention_layernorm.weight")}
        layer.update({ours: fetch(p + hf + ".weight", transpose=True) for ours, hf in _LAYER_LINEARS.items()})
        if config.attention_bias:
            layer.update({ours: fetch(p + hf + ".bias") for ours, hf in _LAYER_BIASES.items()})
        params[f"layers_{i}"] = layer
    return params


def params_nbytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def random_params(config: ModelConfig, dtype, seed: int = 0, scale: float = 0.02, head_dtype=None):
    """Random weights with a model's true shapes (benchmarks and planning without a checkpoint)."""
    rng = np.random.default_rng(seed)

    def get(name):
        shape = expected_shapes(config)[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * scale)

    return build_params(config, get, dtype, desc="random weights", head_dtype=head_dtype)


def _quiet() -> bool:
    return os.environ.get("JAXINFER_QUIET", "") == "1"
