"""GGUF checkpoints (llama.cpp) via the `gguf` package: metadata -> ModelConfig, tensors -> weight pytree.

Q4_0, Q4_1 and Q8_0 tensors are repacked into `QuantizedWeight` blocks as they are (no float round trip) unless
the load asks for float weights; other quantized types (Q4_K, Q5_K, Q6_K, ...) are dequantized with
`gguf.quants.dequantize`. llama.cpp stores Q/K projections permuted for its interleaved RoPE; we undo that so the
weights use HF's rotate-half layout, which is what jaxinfer's model (and HF transformers) implement: a
permutation of output rows, which packed blocks undergo as well (columns of the `[in, out]` packed weight).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from jaxinfer.config import ModelConfig, UnsupportedModelError
from jaxinfer.loaders.common import Checkpoint, CheckpointError, build_params
from jaxinfer.quantization import from_gguf
from jaxinfer.quantization.weight import permute_columns

_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}

# GGUF tensor name (under blk.N.) -> HF name (under model.layers.N.)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


_shared: list = []  # [((path, size, mtime_ns), GGUFReader)]: the last file read, for the next reader of it


def shared_reader(path: str):
    """A GGUFReader of `path`, parsed once for the weights and the tokenizer (parsing the metadata of a
    49k-token vocabulary takes seconds). One file is kept until `release_shared_reader()`; a file rewritten
    since (size or mtime changed) is parsed again. Raises what GGUFReader raises."""
    import gguf

    st = os.stat(path)
    stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if _shared and _shared[0][0] == stamp:
        return _shared[0][1]
    with _plain_array_mapping():
        reader = gguf.GGUFReader(path)
    _shared[:] = [(stamp, reader)]
    return reader


class _NumpyMappingPlainArrays:
    """numpy, except that `memmap` hands back a plain ndarray view of the mapping (the same memory)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def memmap(*args, **kwargs):
        return np.memmap(*args, **kwargs).view(np.ndarray)


_reader_lock = threading.Lock()


@contextlib.contextmanager
def _plain_array_mapping():
    """GGUFReader slices its np.memmap once per metadata value (about a million slices for a 49k-token vocabulary
    and its merges), and each memmap slice runs numpy's Python-level memmap hooks: 5.4 s of a 7 s load here. The
    same slices of a plain ndarray over the same mapping take 2.5 s, and the reader's arrays are identical."""
    import gguf.gguf_reader as reader_module

    with _reader_lock:
        reader_module.np = _NumpyMappingPlainArrays()
        try:
            yield
        finally:
            reader_module.np = np


def release_shared_reader() -> None:
    """Drop the kept reader (its parsed metadata and file mapping) once weights and tokenizer are loaded."""
    _shared.clear()


def open_gguf(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return shared_reader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise CheckpointError(f"corrupt or unreadable GGUF file {path}: {type(e).__name__}: {e}") from e


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader, name: str = "") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; jaxinfer supports {sorted(_GGUF_ARCHS)}")
    a = arch
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    kv_heads = int(_field(reader, f"{a}.attention.head_count_kv", heads))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{a}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    rope_scaling = None
    if _field(reader, f"{a}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{a}.rope.scaling.factor"))}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError("GGUF with precomputed rope_freqs (Llama 3.1 scaling) is not supported yet; "
                                    "load the HF safetensors checkpoint instead")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{a}.feed_forward_length")),
        num_layers=int(_field(reader, f"{a}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, f"{a}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
        max_position_embeddings=int(_field(reader, f"{a}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        architecture=_GGUF_ARCHS[arch],
        name=name or str(_field(reader, "general.name", "")),
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation (interleaved pairs -> rotate-half halves) on [out, ...]."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


REPACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # kept packed (jaxinfer.quantization.from_gguf)


def _rope_permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's RoPE permutation: `_unpermute_rope(w) == w[order]`."""
    return _unpermute_rope(np.arange(n_rows), n_heads)


def gguf_tensor_getter(reader, config: ModelConfig, packed: bool = True):
    """`get(hf_name)` over a GGUF file: a float array in HF layout, or with `packed` a QuantizedWeight
    (`[in, out]`) for Q4_0 / Q4_1 / Q8_0 tensors."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    by_hf_name = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            by_hf_name[_GLOBAL_NAMES[t.name]] = t
        elif t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest in _LAYER_NAMES:
                by_hf_name[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = t

    def rope_heads(hf_name: str):
        if ".q_proj." in hf_name:
            return config.num_heads
        return config.num_kv_heads if ".k_proj." in hf_name else None

    def get(hf_name: str):
        t = by_hf_name[hf_name]  # KeyError -> "missing tensor" in build_params
        hf_shape = tuple(int(d) for d in reversed(t.shape))
        if packed and t.tensor_type.name in REPACKED_TYPES and len(hf_shape) == 2:
            w = from_gguf(np.asarray(t.data).reshape(hf_shape[0], -1), t.tensor_type)
            heads = rope_heads(hf_name)
            return w if heads is None else permute_columns(w, _rope_permutation(hf_shape[0], heads))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            data = np.asarray(t.data)
            if t.tensor_type == GGMLQuantizationType.BF16:
                data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            data = dequantize(t.data, t.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape(hf_shape)
        heads = rope_heads(hf_name)
        return data if heads is None else _unpermute_rope(data, heads)

    return get


def open_gguf_checkpoint(path: str) -> Checkpoint:
    """A GGUF file: its config from the metadata now, its tensors when the checkpoint is loaded (the file is
    memory-mapped once for both)."""
    reader = open_gguf(path)
    config = config_from_gguf(reader, name=os.path.basename(path))

    def load(dtype, head_dtype=None, quantization=None, place=None):
        try:
            # Float weights wanted: dequantize with gguf's own code (what HF transformers does too)
            get = gguf_tensor_getter(reader, config, packed=quantization in (None, "packed"))
            return build_params(config, get, dtype, desc=f"loading {os.path.basename(path)}",
                                head_dtype=head_dtype, quantization=quantization, place=place)
        except (ValueError, IndexError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"corrupt tensor data in GGUF file {path}: {e}") from e

    return Checkpoint(path, config, load)


def load_gguf(path: str, dtype, head_dtype=None, quantization="dequantize"):
    """(config, params); float weights unless `quantization` says otherwise (None keeps Q4_0/Q4_1/Q8_0 packed)."""
    checkpoint = open_gguf_checkpoint(path)
    return checkpoint.config, checkpoint.load(dtype, head_dtype, quantization)
