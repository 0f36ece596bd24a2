"""Bad checkpoints and model names give one clear error naming the problem."""
from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import UnsupportedModelError
from jaxinfer.loaders import CheckpointError, load_weights
from jaxinfer.registry import UnknownModelError


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        load_weights("no-such-model", jnp.float32)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        from jaxinfer.loaders.gguf import load_gguf
        load_gguf(str(tmp_path / "absent.gguf"), jnp.float32)


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))  # header and part of the tensor data only
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        load_weights(str(bad), jnp.float32)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(CheckpointError, match="corrupt or unreadable GGUF"):
        load_weights(str(bad), jnp.float32)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'"):
        load_weights(str(path), jnp.float32)
