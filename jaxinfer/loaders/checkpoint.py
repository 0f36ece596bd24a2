"""Orbax checkpoints: the weight pytree already in our layout and dtype, so loading is a straight restore
(no transposes, no dequantization) — the fast path after a one-time `jaxinfer convert`.

Layout of a checkpoint directory:
    PATH/jaxinfer_config.json  ModelConfig.to_hf_config() + "name" (+ quantized-weight metadata); written
                               last, so a crashed save does not look like a checkpoint. Not named config.json,
                               so the directory is never mistaken for a HF model directory.
    PATH/params/               orbax StandardCheckpointer directory holding the pytree
    PATH/tokenizer.json, ...   optional: convert() saves the source's tokenizer beside them
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import Checkpoint, CheckpointError, params_nbytes, read_json
from jaxinfer.params import Kind, iter_leaves, model_specs, set_leaf

CONFIG_FILE = "jaxinfer_config.json"  # what jaxinfer.loaders.load_weights looks for
PARAMS_DIR = "params"
FORMAT_KEY = "jaxinfer_checkpoint"
FORMAT_VERSION = 1
QUANT_KEY = "quantized_weights"


def is_orbax_checkpoint(path: str) -> bool:
    """True for a directory written by save_checkpoint."""
    path = os.path.abspath(os.path.expanduser(path))
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_checkpoint(path: str, config: ModelConfig, params, overwrite: bool = False) -> str:
    """Write `params` and `config` under `path` (relative paths are fine). Returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))  # orbax requires absolute paths
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; remove it or pass overwrite=True to replace it")
        if not is_orbax_checkpoint(path):  # overwrite replaces a checkpoint, never an arbitrary directory
            raise CheckpointError(f"refusing to overwrite {path}: it is not a jaxinfer orbax checkpoint")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    start = time.perf_counter()
    plain, quantized = _split_quantized(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(path, PARAMS_DIR), plain)
        checkpointer.wait_until_finished()  # save is asynchronous
    meta = {**config.to_hf_config(), "name": config.name, FORMAT_KEY: FORMAT_VERSION, QUANT_KEY: quantized}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    _log(f"saved {params_nbytes(params) / 2**20:.1f} MiB orbax checkpoint to {path} "
         f"in {time.perf_counter() - start:.2f}s")
    return path


def open_orbax_checkpoint(path: str) -> Checkpoint:
    """A checkpoint written by save_checkpoint: its config now, its weights when loaded."""
    path = os.path.abspath(os.path.expanduser(path))
    config, _ = _read_config(path)
    return Checkpoint(path, config, lambda dtype, head_dtype=None, place=None: load_checkpoint(
        path, dtype, head_dtype, place)[1])


def load_checkpoint(path: str, dtype=None, head_dtype=None, place=None) -> tuple[ModelConfig, dict]:
    """Restore (config, params) written by save_checkpoint. `dtype` casts the plain floating weights (None: as
    saved), `head_dtype` the embedding and LM head (default: dtype); quantized weights always keep their saved
    codes and scale dtypes. With a `place` hook (see `common.build_params`) the tensors are restored to host
    memory and each one is placed by the hook (e.g. straight into its shards)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))
    config, quantized = _read_config(path)
    params_dir = os.path.join(path, PARAMS_DIR)
    start = time.perf_counter()
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            meta = checkpointer.metadata(params_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read orbax checkpoint metadata in {params_dir}: {e}") from None
        # Restore into an explicit target on *this* host's default device: without one, orbax reuses the
        # sharding recorded at save time (e.g. cuda:0), which fails when loading on another machine.
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        heads = {s.key for s in model_specs(config) if s.kind == Kind.HEAD}

        def wanted_dtype(keypath, m):
            name = _path_str(keypath)
            want = head_dtype if head_dtype is not None and name in heads else dtype
            return _cast(m.dtype, want if want is not None and not _under(name, quantized) else None)

        def abstract(keypath, m):
            return jax.ShapeDtypeStruct(m.shape, wanted_dtype(keypath, m), sharding=device)

        def host(keypath, m):  # numpy targets restore to host memory, in the saved dtype
            return np.zeros(m.shape, m.dtype)

        target = jax.tree_util.tree_map_with_path(abstract if place is None else host, tree)
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as e:  # orbax/tensorstore raise many types for missing or damaged chunks
            raise CheckpointError(f"cannot restore orbax checkpoint {params_dir}: {e}") from None
    if place is not None:
        params = jax.tree_util.tree_map_with_path(lambda kp, a, m: a.astype(wanted_dtype(kp, m)), params, tree)
        params = _place_all(config, _join_quantized(params, quantized), place)
    else:
        params = _join_quantized(params, quantized)
    jax.block_until_ready(params)
    _log(f"restored {params_nbytes(params) / 2**20:.1f} MiB from {path} in {time.perf_counter() - start:.2f}s")
    return config, params


def convert(src: str, dst: str, load_fn: Callable[[str], tuple], overwrite: bool = False,
            copy_tokenizer: bool = True) -> dict:
    """`jaxinfer convert SRC DST`: load any source with `load_fn(src) -> (config, params)` (normally
    `lambda s: jaxinfer.loaders.load_weights(s, dtype)`), save it as an orbax checkpoint, then time loading
    it back. With copy_tokenizer the source's tokenizer (GGUF metadata or HF files) is saved into DST too, so
    `load_tokenizer(DST)` works and the checkpoint is self-contained."""
    start = time.perf_counter()
    config, params = load_fn(src)
    jax.block_until_ready(params)
    from_source = time.perf_counter() - start
    save_checkpoint(dst, config, params, overwrite=overwrite)
    del params  # do not hold two copies while timing the restore
    if copy_tokenizer:
        from jaxinfer.registry import resolve_model

        _copy_tokenizer(resolve_model(src), dst)
    start = time.perf_counter()
    load_checkpoint(dst)
    from_orbax = time.perf_counter() - start
    print(f"convert from source ({src}): {from_source:.2f}s")
    print(f"load from orbax ({os.path.abspath(dst)}): {from_orbax:.2f}s")
    return {"config": config, "load_source_s": from_source, "load_orbax_s": from_orbax}


# ---------------------------------------------------------------- quantized weights
# QuantizedWeight keeps bits/group_size as static pytree metadata, which orbax does not store. We save each one
# as a plain dict of its arrays and record the static fields in jaxinfer_config.json, keyed by the weight's path.

_QUANT_ARRAYS = ("qweight", "scales", "offsets", "perm")


def _split_quantized(tree, path: str = "", out: dict | None = None):
    out = {} if out is None else out
    if isinstance(tree, dict):
        return {k: _split_quantized(v, _join(path, k), out)[0] for k, v in tree.items()}, out
    if isinstance(tree, (list, tuple)):
        return type(tree)(_split_quantized(v, _join(path, i), out)[0] for i, v in enumerate(tree)), out
    if dataclasses.is_dataclass(tree) and hasattr(tree, "qweight"):
        out[path] = {"bits": tree.bits, "group_size": tree.group_size}
        return {f: getattr(tree, f) for f in _QUANT_ARRAYS if getattr(tree, f) is not None}, out
    return tree, out


def _join_quantized(tree, quantized: dict, path: str = ""):
    if path in quantized:
        from jaxinfer.quantization import QuantizedWeight

        return QuantizedWeight(**{f: tree.get(f) for f in _QUANT_ARRAYS}, **quantized[path])
    if not quantized:
        return tree
    if isinstance(tree, dict):
        return {k: _join_quantized(v, quantized, _join(path, k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_join_quantized(v, quantized, _join(path, i)) for i, v in enumerate(tree))
    return tree


def _place_all(config: ModelConfig, params: dict, place) -> dict:
    out: dict = {}
    for spec, value in iter_leaves(params, model_specs(config)):
        set_leaf(out, spec, place(spec, value))
    return out


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _path_str(keypath) -> str:
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath]
    return "/".join(str(p) for p in parts)


def _under(path: str, quantized: dict) -> bool:
    return any(path == q or path.startswith(q + "/") for q in quantized)


def _copy_tokenizer(src: str, dst: str) -> None:
    from jaxinfer.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(src)
    except Exception as e:  # weights without a tokenizer are still a valid checkpoint
        print(f"warning: no tokenizer copied from {src} ({type(e).__name__}: {e})")
        return
    # tokenizer.json etc. land beside jaxinfer_config.json. (Never write a config.json here: transformers 5's
    # AutoTokenizer would read its model_type and rebuild e.g. a LlamaTokenizer, replacing the saved one.)
    tokenizer.hf.save_pretrained(os.path.abspath(os.path.expanduser(dst)))


def _read_config(path: str) -> tuple[ModelConfig, dict]:
    if not os.path.isdir(path):
        raise CheckpointError(f"orbax checkpoint directory not found: {path}")
    file = os.path.join(path, CONFIG_FILE)
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path} is not a jaxinfer orbax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    hf = read_json(file)
    name = hf.pop("name", "")
    hf.pop(FORMAT_KEY, None)
    quantized = hf.pop(QUANT_KEY, None) or {}
    return ModelConfig.from_hf_config(hf, name=name), quantized


def _cast(saved, requested):
    # Only floating weights follow `dtype`; integer leaves (packed quantized weights) keep their type.
    if requested is None or not jnp.issubdtype(saved, jnp.floating):
        return saved
    return jnp.dtype(requested)


def _log(msg: str) -> None:
    if os.environ.get("JAXINFER_QUIET", "") != "1":
        print(msg)
