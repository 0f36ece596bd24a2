"""GGUF K-quants (Q4_K, Q5_K, Q6_K) load as float weights equal to an independent reader's: the default SmolLM2
file rewritten with some layers' down projections (the only linears whose input dim, 1536, is a whole number of
256-value super-blocks) stored as K-quant blocks, read by us and by HF transformers' GGUF loader."""
from __future__ import annotations

import numpy as np
import pytest

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

K_QUANTS = {0: GGMLQuantizationType.Q4_K, 1: GGMLQuantizationType.Q5_K, 2: GGMLQuantizationType.Q6_K}
# Byte offsets of each block's f16 super-block scales (the rest is 4/5/6-bit codes and 6/8-bit sub-scales, any
# bit pattern of which is a valid block): Q4_K/Q5_K start with d and dmin, Q6_K ends with d.
SCALE_OFFSETS = {GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2),
                 GGMLQuantizationType.Q6_K: (208,)}


def random_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """[rows, bytes per row] of random K-quant blocks whose f16 scales are finite and of a weight's size."""
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(1e-4, 2e-3, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def rewrite_with_kquants(src: str, dst: str, seed: int = 0) -> None:
    """Copy the GGUF at src to dst, every metadata field and tensor as it is except K_QUANTS' down projections."""
    reader, rng = GGUFReader(src), np.random.default_rng(seed)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        if layer in K_QUANTS and t.name.endswith("ffn_down.weight"):
            cols, rows = (int(d) for d in t.shape)  # ggml order: [in, out]
            writer.add_tensor(t.name, random_blocks(rng, rows, cols, K_QUANTS[layer]), raw_dtype=K_QUANTS[layer])
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def kquant_gguf(gguf_path, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kquants") / "smollm2-kquants.gguf")
    rewrite_with_kquants(gguf_path, path)
    return path


def test_the_rewritten_file_holds_the_k_quants(kquant_gguf):
    types = {t.name: t.tensor_type for t in GGUFReader(kquant_gguf).tensors}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in K_QUANTS] == list(K_QUANTS.values())


def test_k_quants_dequantize_as_hf_transformers_reads_them(kquant_gguf):
    import os

    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.loaders.gguf import load_gguf
    from jaxinfer.params import iter_leaves, model_specs

    config, params = load_gguf(kquant_gguf, jnp.float32)
    ours = {s.hf_name: np.asarray(v).T if s.hf_transposed else np.asarray(v)
            for s, v in iter_leaves(params, model_specs(config))}
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(kquant_gguf), gguf_file=os.path.basename(kquant_gguf),
                                              dtype=torch.float32)
    theirs = {name: p.detach().numpy() for name, p in hf.state_dict().items()}
    for layer in K_QUANTS:
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert np.abs(theirs[name]).max() > 0
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # and the file's other tensors are untouched by the K-quant ones beside them
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.layers.1.self_attn.q_proj.weight"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_a_packed_load_keeps_q4_1_packed_and_expands_the_k_quants(kquant_gguf, smollm):
    import jax.numpy as jnp

    from jaxinfer.loaders.gguf import load_gguf
    from jaxinfer.quantization import QuantizedWeight, dequantize

    _, packed = load_gguf(kquant_gguf, jnp.float32, quantization=None)
    _, floats = load_gguf(kquant_gguf, jnp.float32)
    for layer in range(4):
        down, up = packed[f"layers_{layer}"]["w_down"], packed[f"layers_{layer}"]["w_up"]
        assert isinstance(up, QuantizedWeight)  # Q4_1 as shipped
        assert isinstance(down, QuantizedWeight) == (layer not in K_QUANTS)
        expanded = np.asarray(dequantize(down) if isinstance(down, QuantizedWeight) else down)
        np.testing.assert_array_equal(expanded, np.asarray(floats[f"layers_{layer}"]["w_down"]))
    _, shipped = smollm
    np.testing.assert_array_equal(np.asarray(floats["layers_3"]["w_down"]), np.asarray(shipped["layers_3"]["w_down"]))
