"""HF safetensors checkpoints (a model directory: config.json + model.safetensors or an index + shards).

Tensors are read lazily by name through `safetensors.safe_open` (memory-mapped), so only one tensor at a time
is materialised on the host before `build_params` casts and places it.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import Checkpoint, CheckpointError, build_params, params_nbytes, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def open_safetensors(path: str) -> Checkpoint:
    """A HF model directory: its config now, its weights (cast to `dtype`) when the checkpoint is loaded.

    Raises CheckpointError (naming the offending file) for a missing directory/config.json/shard, a corrupt
    file or a missing tensor, and config.UnsupportedModelError for an architecture we do not implement.
    """
    model_dir = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory not found: {model_dir}")
    config = ModelConfig.from_hf_config(read_hf_config(model_dir), name=os.path.basename(model_dir))

    def load(dtype, head_dtype=None, place=None):
        start = time.perf_counter()
        with _TensorSource(model_dir) as source:
            params = build_params(config, source.get, dtype, desc=f"loading {os.path.basename(model_dir)}",
                                  head_dtype=head_dtype, place=place)
        if os.environ.get("JAXINFER_QUIET", "") != "1":
            print(f"loaded {params_nbytes(params) / 2**20:.1f} MiB from {len(source.files)} safetensors file(s) "
                  f"in {time.perf_counter() - start:.2f}s")
        return params

    return Checkpoint(model_dir, config, load)


def load_safetensors(path: str, dtype, head_dtype=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a HF model directory, weights cast to `dtype`."""
    checkpoint = open_safetensors(path)
    return checkpoint.config, checkpoint.load(dtype, head_dtype)


def read_hf_config(model_dir: str) -> dict:
    """config.json as a dict, normalised for ModelConfig.from_hf_config."""
    file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{model_dir} has no config.json (expected a Hugging Face model directory)")
    return read_json(file)


def shard_files(model_dir: str) -> dict[str, str]:
    """tensor name -> safetensors file path, from the index when there is one."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"cannot read shard index {index}: {e!r}") from None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(model_dir, f))})
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing from {model_dir}: {missing}")
        return {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    files = [single] if os.path.isfile(single) else sorted(
        os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files in {model_dir}")
    # No index: read each file's header to learn which tensors it holds.
    return {name: file for file in files for name in _open(file).keys()}


def _open(file: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:  # truncated, bad header, unreadable
        raise CheckpointError(f"corrupt or unreadable safetensors file {file}: {e}") from None


class _TensorSource:
    """`get(name) -> np.ndarray` over all shards; keeps each shard's handle open while loading."""

    def __init__(self, model_dir: str):
        self.locations = shard_files(model_dir)
        self.files = sorted(set(self.locations.values()))
        self._handles: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()  # safe_open handles are closed (and unmapped) when released

    def get(self, name: str) -> np.ndarray:
        file = self.locations.get(name)
        if file is None:
            raise KeyError(name)  # build_params turns this into "checkpoint is missing tensor ..."
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = _open(file)
        if name not in handle.keys():
            raise CheckpointError(f"{file} does not contain tensor {name!r} although the index says it does")
        try:
            return handle.get_tensor(name)
        except TypeError:
            # numpy has no bfloat16/float8, so the numpy framework refuses them: read the raw bytes instead.
            return _read_raw(file, name)
        except Exception as e:  # safetensors raises its own error types for bad offsets etc.
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from None


# safetensors dtype tags numpy cannot name natively; ml_dtypes (a jax dependency) provides them.
def _ml_dtype(tag: str):
    import ml_dtypes

    table = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if tag not in table:
        raise CheckpointError(f"unsupported safetensors dtype {tag}")
    return np.dtype(table[tag])


def _read_raw(file: str, name: str) -> np.ndarray:
    """Read one tensor straight from the file layout: u64 header length, JSON header, then raw data whose
    offsets the header gives relative to the end of the header."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
        begin, end = info["data_offsets"]
        dtype = _ml_dtype(info["dtype"])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"tensor {name!r} in {file}: byte size {end - begin} does not match its "
                                  f"shape {info['shape']} and dtype {info['dtype']}")
        data = np.memmap(file, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=(count,))
    return data.reshape(info["shape"])
