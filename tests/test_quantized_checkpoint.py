"""Quantized checkpoints written by `jaxinfer quantize`: the GPTQ and AWQ tensors decode, by a reader written here
from the formats' specifications (plain numpy bit arithmetic, not our packers), to exactly the weights the
quantizer chose; read back through jaxinfer.quantization's repackers they run the model with the same outputs.

(HF transformers' own GPTQ / AWQ integration needs gptqmodel, whose install would replace this machine's torch
with a CUDA build, so the independent reader is the one below.)"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.params import model_specs
from jaxinfer.quantization import dequantize
from jaxinfer.loaders import load_weights
from jaxinfer.quantization.hf_format import save_quantized
from jaxinfer.quantization.pipeline import QuantizeSettings, quantize_params
from jaxinfer.quantization.weight import packing_of
from model_utils import prefill_logits

SQUARE = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                     head_dim=16, rope_theta=5000.0)
VALID_TXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


# ------------------------------------------------------------------- readers written from the specifications

def _u32(words):
    return np.asarray(words).astype(np.int64) & 0xFFFFFFFF


def reference_gptq(t: dict, bits: int, zero_offset: int) -> np.ndarray:
    """GPTQ: input k of output n is bits [bits*(k % p), +bits) of qweight[k // p, n] (p = 32 / bits); the zero
    point of group g, column n is field n % p of qzeros[g, n // p], plus 1 in the v1 format; the group of input
    k is g_idx[k]; W[k, n] = scales[g_idx[k], n] * (q - z)."""
    p, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].astype(np.float32), t["g_idx"]
    K, N = qweight.shape[0] * p, scales.shape[1]
    k, n = np.arange(K), np.arange(N)
    q = (_u32(qweight)[k // p, :] >> (bits * (k % p))[:, None]) & mask
    z = ((_u32(qzeros)[:, n // p] >> (bits * (n % p))[None, :]) & mask) + zero_offset
    return ((q - z[g_idx]) * scales[g_idx]).astype(np.float32)


def reference_awq(t: dict, group_size: int) -> np.ndarray:
    """AWQ GEMM: nibble i of word j in a row holds column 8j + (0, 2, 4, 6, 1, 3, 5, 7)[i], in qweight (rows are
    inputs) and qzeros (rows are groups) alike; W[k, n] = scales[k // gs, n] * (q - z)."""
    columns_of_nibble = [0, 2, 4, 6, 1, 3, 5, 7]
    nibble_of = np.array([columns_of_nibble.index(c) for c in range(8)])

    def unpack(words):
        n = np.arange(words.shape[1] * 8)
        return (_u32(words)[:, n // 8] >> (4 * nibble_of[n % 8])[None, :]) & 0xF

    q, z, scales = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].astype(np.float32)
    g = np.arange(q.shape[0]) // group_size
    return ((q - z[g]) * scales[g]).astype(np.float32)


def _layer_tensors(tensors: dict, layer: int, name: str) -> dict:
    prefix = f"model.layers.{layer}.{HF_MODULES[name]}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def tiny():
    params = random_params(SQUARE, jnp.float32, seed=7)
    ids = np.random.default_rng(4).integers(0, SQUARE.vocab_size, (4, 24)).astype(np.int32)
    return params, ids


CASES = {  # name: QuantizeSettings fields
    "gptq-act-order": dict(method="gptq", bits=4, group_size=32, act_order=True),
    "rtn-asym": dict(method="rtn", bits=4, group_size=32, sym=False),  # v1: zero points kept >= 1
    "rtn-int8-per-channel": dict(method="rtn", bits=8, group_size=-1),
    "rtn-asym-gptq_v2": dict(method="rtn", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
    "awq": dict(method="awq", bits=4, group_size=32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_tensors_decode_by_the_specification_to_the_quantized_weights(case, tiny, tmp_path):
    params, ids = tiny
    settings = QuantizeSettings(calib="-", **CASES[case])
    model = quantize_params(SQUARE, params, settings, ids, progress=False)
    save_quantized(str(tmp_path), model)
    with open(tmp_path / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    s = settings
    if s.method == "awq":
        assert qc == {**qc, "quant_method": "awq", "version": "gemm", "bits": 4, "w_bit": 4, "group_size": 32,
                      "q_group_size": 32, "zero_point": True}
    else:
        assert qc == {**qc, "quant_method": "gptq", "bits": s.bits, "group_size": s.group_size,
                      "desc_act": s.act_order, "sym": s.sym, "checkpoint_format": s.checkpoint_format}
        with open(tmp_path / "quantize_config.json") as f:
            assert json.load(f) == qc
    K = N = 64
    groups = 1 if s.group_size == -1 else K // s.group_size
    for name in HF_MODULES:
        t = _layer_tensors(tensors, 0, name)
        want = model.weights[f"layers_0/{name}"].dequantize()
        if s.method == "awq":
            assert sorted(t) == ["qweight", "qzeros", "scales"]
            assert (t["qweight"].shape, t["qzeros"].shape) == ((K, N // 8), (groups, N // 8))
            got = reference_awq(t, 32)
        else:
            assert sorted(t) == ["g_idx", "qweight", "qzeros", "scales"]
            p = 32 // s.bits
            assert (t["qweight"].shape, t["qzeros"].shape, t["g_idx"].shape) == ((K // p, N), (groups, N // p), (K,))
            assert t["g_idx"].dtype == np.int32
            got = reference_gptq(t, s.bits, zero_offset=1 if s.checkpoint_format == "gptq" else 0)
        assert t["qweight"].dtype == np.int32 and t["scales"].dtype == np.float16 and t["scales"].shape == (groups, N)
        np.testing.assert_array_equal(got, want)
    # float tensors in HF layout; AWQ's norms carry the folded scales
    np.testing.assert_array_equal(tensors["model.layers.0.input_layernorm.weight"],
                                  np.asarray(model.params["layers_0"]["attn_norm"]))
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(params["embed"]))
    np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(params["lm_head"]).T)
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors


@pytest.mark.parametrize("case", ["gptq-act-order", "rtn-int8-per-channel", "awq"])
def test_round_trip_through_load_weights_gives_the_same_model_outputs(case, tiny, tmp_path):
    """quantize -> save (HF format) -> load_weights, kept packed (QuantizedWeight) -> the model's forward equals
    the forward of the quantizer's own (dequantized) weights before saving."""
    params, ids = tiny
    model = quantize_params(SQUARE, params, QuantizeSettings(calib="-", **CASES[case]), ids, progress=False)
    save_quantized(str(tmp_path), model)
    config, packed = load_weights(str(tmp_path), jnp.float32, verbose=False)
    assert config == dataclasses.replace(SQUARE, name=config.name)
    assert [k for k, _ in packing_of(packed)] == sorted(model.weights)
    for key, w in model.weights.items():
        layer, name = key.split("/")
        np.testing.assert_allclose(np.asarray(dequantize(packed[layer][name])), w.dequantize(), rtol=1e-6,
                                   atol=1e-7)
    tokens = ids[0].tolist()
    before = prefill_logits(SQUARE, model.params, tokens)
    np.testing.assert_allclose(prefill_logits(SQUARE, packed, tokens), before, rtol=1e-4, atol=1e-5)


def test_quantize_command_writes_a_loadable_checkpoint(tokenizer, tmp_path):
    """`jaxinfer quantize` end to end on a tiny float HF checkpoint with the real tokenizer (calibration text
    is encoded with it): the output has the tokenizer, the config and GPTQ tensors for every linear."""
    from jaxinfer.cli import main
    from jaxinfer.tokenizer import load_tokenizer

    config = ModelConfig(**{**SQUARE.__dict__, "vocab_size": 49152, "num_layers": 2})
    params = random_params(config, jnp.float32, seed=1)
    src = tmp_path / "float"
    src.mkdir()
    tensors = {}
    for spec in model_specs(config):
        node = params
        for k in spec.path:
            node = node[k]
        arr = np.asarray(node)
        tensors[spec.hf_name] = np.ascontiguousarray(arr.T if spec.hf_transposed else arr)
    save_file(tensors, str(src / "model.safetensors"))
    with open(src / "config.json", "w") as f:
        json.dump(config.to_hf_config(), f)
    tokenizer.hf.save_pretrained(str(src))
    dst = tmp_path / "gptq"
    main(["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--act-order", "--calib", VALID_TXT,
          "--num-samples", "4", "--seq-len", "16", str(src), str(dst)])
    with open(dst / "config.json") as f:
        hf = json.load(f)
    assert hf["quantization_config"]["desc_act"] is True and hf["num_hidden_layers"] == 2
    out = load_file(str(dst / "model.safetensors"))
    assert sum(k.endswith(".qweight") for k in out) == 14
    assert load_tokenizer(str(dst)).encode("Quantized checkpoints") == tokenizer.encode("Quantized checkpoints")
    _, packed = load_weights(str(dst), jnp.float32, verbose=False)
    assert len(packing_of(packed)) == 14
