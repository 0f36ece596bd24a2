"""Checkpoint loaders. `open_checkpoint(source)` reads a checkpoint's config and returns a `Checkpoint` whose
`load(dtype, head_dtype)` reads the weights; `load_weights(source, dtype)` does both. The format is picked by what
`source` is: a registered name, `random:<preset>`, a `.gguf` file, an orbax checkpoint or an HF directory."""
from __future__ import annotations

import os
import time

from jaxinfer.loaders.common import Checkpoint, CheckpointError, params_nbytes


def open_checkpoint(source: str) -> Checkpoint:
    from jaxinfer.registry import resolve_model

    path = resolve_model(source)
    if path.startswith("random:"):
        from jaxinfer.config import load_preset
        from jaxinfer.loaders.common import random_params

        config = _random_config(path.split(":", 1)[1])
        return Checkpoint(path, config, lambda dtype, head_dtype=None, place=None: random_params(
            config, dtype, head_dtype=head_dtype, place=place))
    if path.endswith(".gguf"):
        from jaxinfer.loaders.gguf import open_gguf_checkpoint

        return open_gguf_checkpoint(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "jaxinfer_config.json")):
        from jaxinfer.loaders.checkpoint import open_orbax_checkpoint

        return open_orbax_checkpoint(path)
    if os.path.isdir(path):
        from jaxinfer.loaders.safetensors import open_safetensors

        return open_safetensors(path)
    raise CheckpointError(f"don't know how to load {path!r}: expected a .gguf file, an HF safetensors "
                          "directory, or a jaxinfer orbax checkpoint directory")


def _random_config(name: str):
    """`random:<preset>` (configs/models/) or `random:/path/to/config.json` (any HF config)."""
    from jaxinfer.config import ModelConfig, load_preset
    from jaxinfer.loaders.common import read_json

    if name.endswith(".json") and os.path.isfile(name):
        return ModelConfig.from_hf_config(read_json(name), name=os.path.basename(name)[:-5])
    return load_preset(name)


def load_params(checkpoint: Checkpoint, dtype, *, head_dtype=None, verbose: bool = True, place=None):
    """The checkpoint's weights in `dtype` (the embedding and LM head in `head_dtype`), logging what was loaded.
    place: where each tensor goes (`build_params`); None = the default device."""
    start = time.perf_counter()
    params = checkpoint.load(dtype, head_dtype, place)
    if verbose:
        config = checkpoint.config
        print(f"[jaxinfer] loaded {config.name or checkpoint.path}: {config.num_params / 1e6:.1f}M params, "
              f"{params_nbytes(params) / 2**30:.3f} GiB of weights ({getattr(dtype, '__name__', dtype)}) "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
    return params


def load_weights(source: str, dtype, *, head_dtype=None, verbose: bool = True):
    """(config, params) from a registered name, GGUF file, HF directory or orbax checkpoint. Weights in `dtype`;
    the embedding and LM head in `head_dtype` (default: dtype)."""
    checkpoint = open_checkpoint(source)
    return checkpoint.config, load_params(checkpoint, dtype, head_dtype=head_dtype, verbose=verbose)
