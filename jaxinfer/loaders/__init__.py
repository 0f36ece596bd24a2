"""Checkpoint loaders. `load_weights(source, dtype) -> (ModelConfig, params)` picks one by what `source` is."""
from __future__ import annotations

import os
import time

from jaxinfer.loaders.common import CheckpointError, params_nbytes


def load_weights(source: str, dtype, *, head_dtype=None, verbose: bool = True):
    """(config, params) from a registered name, GGUF file, HF directory or orbax checkpoint. Weights in `dtype`;
    the embedding and LM head in `head_dtype` (default: dtype)."""
    from jaxinfer.registry import resolve_model

    path = resolve_model(source)
    start = time.perf_counter()
    if path.startswith("random:"):
        from jaxinfer.config import load_preset
        from jaxinfer.loaders.common import random_params

        config = load_preset(path.split(":", 1)[1])
        params = random_params(config, dtype, head_dtype=head_dtype)
    elif path.endswith(".gguf"):
        from jaxinfer.loaders.gguf import load_gguf

        config, params = load_gguf(path, dtype, head_dtype)
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "jaxinfer_config.json")):
        from jaxinfer.loaders.checkpoint import load_checkpoint

        config, params = load_checkpoint(path, dtype, head_dtype)
    elif os.path.isdir(path):
        from jaxinfer.loaders.safetensors import load_safetensors

        config, params = load_safetensors(path, dtype, head_dtype)
    else:
        raise CheckpointError(f"don't know how to load {path!r}: expected a .gguf file, an HF safetensors "
                              "directory, or a jaxinfer orbax checkpoint directory")
    if verbose:
        print(f"[jaxinfer] loaded {config.name or source}: {config.num_params / 1e6:.1f}M params, "
              f"{params_nbytes(params) / 2**30:.3f} GiB of weights ({dtype.__name__ if hasattr(dtype, '__name__') else dtype}) "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
    return config, params
