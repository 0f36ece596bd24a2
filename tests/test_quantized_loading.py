"""Quantized checkpoints load kept packed: HF GPTQ / AWQ directories written by `quant_checkpoints.py` (from the
formats' specifications, with plain loops, not our packers) against their float twins (the same model with each
quantized linear stored as its reference dequantization); the default Q4_1 GGUF; quantize-on-load; refusals."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.loaders import CheckpointError, load_weights, params_nbytes
from jaxinfer.params import Kind, iter_leaves, model_specs
from jaxinfer.quantization import QuantizedWeight, dequantize
from jaxinfer.quantization.weight import packing_of
from model_utils import prefill_logits
from quant_checkpoints import write_quantized_pair

GPTQ_CASES = {  # name: write_quantized_pair arguments; every setting the issue lists appears at least once
    "4-bit g128 sym": dict(bits=4, group_size=128, sym=True, desc_act=False),
    "4-bit g32 asym act-order": dict(bits=4, group_size=32, sym=False, desc_act=True),
    "4-bit g64 asym gptq_v2": dict(bits=4, group_size=64, sym=False, desc_act=False, checkpoint_format="gptq_v2"),
    "8-bit per-channel asym": dict(bits=8, group_size=-1, sym=False, desc_act=False),
    "8-bit g32 act-order gptq_v2": dict(bits=8, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
}


def _layer_weights(config, params):
    return {s.key: v for s, v in iter_leaves(params, model_specs(config)) if s.kind == Kind.LINEAR}


def _assert_same_weights(quant_dir, float_dir):
    config, packed = load_weights(quant_dir, jnp.float32, quantization=None, verbose=False)
    _, floats = load_weights(float_dir, jnp.float32, verbose=False)
    packed_layers, float_layers = _layer_weights(config, packed), _layer_weights(config, floats)
    assert all(isinstance(v, QuantizedWeight) for v in packed_layers.values())
    for key, w in packed_layers.items():
        np.testing.assert_allclose(np.asarray(dequantize(w)), np.asarray(float_layers[key]), rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    return config, packed, floats


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_gptq_checkpoints_load_packed_with_the_reference_weights(case, tmp_path):
    _assert_same_weights(*write_quantized_pair(str(tmp_path), "gptq", **GPTQ_CASES[case]))


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_checkpoints_load_packed_with_the_reference_weights(group_size, tmp_path):
    _assert_same_weights(*write_quantized_pair(str(tmp_path), "awq", group_size=group_size))


def test_a_packed_model_runs_with_the_float_twins_outputs(tmp_path):
    """Mixed plain (embedding, head, norms) and packed (act-order GPTQ) leaves through the model's forward."""
    config, packed, floats = _assert_same_weights(*write_quantized_pair(str(tmp_path), "gptq",
                                                                          **GPTQ_CASES["4-bit g32 asym act-order"]))
    tokens = [3, 17, 5, 90, 44, 2, 61, 8, 8, 30]
    np.testing.assert_allclose(prefill_logits(config, packed, tokens), prefill_logits(config, floats, tokens),
                               rtol=1e-4, atol=1e-4)


def test_packed_weights_report_their_packed_bytes(tmp_path):
    quant_dir, float_dir = write_quantized_pair(str(tmp_path), "gptq", **GPTQ_CASES["4-bit g128 sym"])
    config, packed = load_weights(quant_dir, jnp.float32, quantization=None, verbose=False)
    w = packed["layers_0"]["w_up"]  # [128, 256]: int32 [16, 256] codes, f16 [1, 256] scales (symmetric)
    assert w.offsets is None and w.nbytes == 16 * 256 * 4 + 256 * 2
    layers = _layer_weights(config, packed)
    float_layer_bytes = 4 * sum(int(np.prod(w.shape)) for w in layers.values())
    others = params_nbytes(packed) - sum(w.nbytes for w in layers.values())
    assert params_nbytes(packed) == others + sum(w.nbytes for w in layers.values())
    assert sum(w.nbytes for w in layers.values()) < float_layer_bytes / 7  # 4-bit codes vs f32


def _write_config(quant_dir, **changes):
    path = os.path.join(quant_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"].update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("changes, message", [
    (dict(bits=3), "bits=3"),
    (dict(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    (dict(group_size=96), "group_size 96 does not divide the input dim 128"),
    (dict(quant_method="hqq"), "quant_method 'hqq'"),
])
def test_unsupported_settings_are_refused_by_name(changes, message, tmp_path):
    quant_dir, _ = write_quantized_pair(str(tmp_path), "gptq", **GPTQ_CASES["4-bit g128 sym"])
    _write_config(quant_dir, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_weights(quant_dir, jnp.float32, quantization=None, verbose=False)


def test_awq_version_gemv_is_refused(tmp_path):
    quant_dir, _ = write_quantized_pair(str(tmp_path), "awq", group_size=32)
    _write_config(quant_dir, version="gemv")
    with pytest.raises(CheckpointError, match="AWQ version 'gemv'"):
        load_weights(quant_dir, jnp.float32, quantization=None, verbose=False)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    quant_dir, _ = write_quantized_pair(str(tmp_path), "gptq", **GPTQ_CASES["4-bit g32 asym act-order"])
    file = os.path.join(quant_dir, "model.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.down_proj.scales"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.scales has shape \(7, 128\)"):
        load_weights(quant_dir, jnp.float32, quantization=None, verbose=False)


# ------------------------------------------------------------------------------ the default model's GGUF

@pytest.fixture(scope="module")
def packed_smollm(gguf_path):
    return load_weights(gguf_path, jnp.float32, head_dtype=jnp.float32, quantization=None, verbose=False)


def test_the_q4_1_gguf_stays_packed_at_the_files_size(packed_smollm, smollm, gguf_path):
    import gguf

    config, params = packed_smollm
    assert len(packing_of(params)) == 7 * config.num_layers + 1  # every linear (Q4_1) and the tied head (Q8_0)
    # the engine holds exactly the file's tensor bytes (Q4_1: 5 bits a weight, Q8_0: 8.5; f32 norms), 36% of bf16
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(gguf_path).tensors)
    assert params_nbytes(params) == file_bytes
    assert params_nbytes(params) < 0.37 * 2 * config.num_params
    # kept as stored: expanding the packed blocks gives gguf's own dequantization (the `smollm` fixture)
    _, floats = smollm
    for key in ("lm_head", "layers_0/wq", "layers_0/wk", "layers_29/w_down"):
        node_p, node_f = params, floats
        for k in key.split("/"):
            node_p, node_f = node_p[k], node_f[k]
        np.testing.assert_array_equal(np.asarray(dequantize(node_p)), np.asarray(node_f), err_msg=key)


def test_the_packed_tied_head_embeds_without_expanding(packed_smollm, smollm):
    """The lookup of a packed tied head gathers and dequantizes the ids' columns: the first layer's input equals
    the float model's embedding rows, exactly."""
    from jaxinfer.quantization.weight import dequantize_columns

    _, params = packed_smollm
    ids = jnp.asarray([1, 504, 49151, 504], jnp.int32)
    rows = jax.jit(dequantize_columns)(params["lm_head"], ids)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(smollm[1]["lm_head"])[:, np.asarray(ids)].T)


# ------------------------------------------------------------------------------------ quantize-on-load

def test_quantize_on_load_int8_and_int4(tmp_path):
    _, float_dir = write_quantized_pair(str(tmp_path), "awq", group_size=32)
    config, floats = load_weights(float_dir, jnp.float32, verbose=False)
    for mode, bits, group, bound in (("int8", 8, 128, 1 / 254), ("int4", 4, 128, 1 / 15), ("int4-g32", 4, 32, 1 / 15)):
        _, q = load_weights(float_dir, jnp.float32, quantization=mode, verbose=False)
        assert not isinstance(q["lm_head"], QuantizedWeight) and not isinstance(q["embed"], QuantizedWeight)
        for key, w in _layer_weights(config, q).items():
            ref = np.asarray(_layer_weights(config, floats)[key])
            assert isinstance(w, QuantizedWeight) and w.bits == bits, key
            assert w.group_size == (ref.shape[0] if mode == "int8" else group), key
            # round to nearest: at most half a step, a step being (max - min) / 15 <= 2 max|w| / 15 (int4 with a
            # minimum) or max|w| / 127 (int8, symmetric)
            err = np.abs(np.asarray(dequantize(w)) - ref).max()
            assert err <= bound * np.abs(ref).max() * 1.01 + 1e-7, (mode, key, err)


def test_quantize_on_load_refuses_a_group_that_does_not_divide(tmp_path):
    _, float_dir = write_quantized_pair(str(tmp_path), "awq", group_size=32)
    with pytest.raises(ValueError, match="group size 96 does not divide"):
        load_weights(float_dir, jnp.float32, quantization="int4-g96", verbose=False)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_weights(float_dir, jnp.float32, quantization="int3", verbose=False)


def test_cpu_runtime_expands_a_packed_head_unless_told_to_keep_it(monkeypatch, tmp_path):
    """On CPU no XLA formulation of a packed tied head comes near a float one (docs/QUANTIZATION.md), so the
    default expands it, exactly, unless the layers' plan runs the native kernel for the head's packing (here the
    layers are int8 per channel and the head Q8_0-like g32, which that plan does not cover);
    quantization="packed" keeps it packed."""
    from jaxinfer.config import ModelConfig
    from jaxinfer.loaders.common import random_params
    from jaxinfer.quantization import quantize
    from jaxinfer.quantization.runtime import prepare_packed_weights

    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))  # the probe's measurement goes here
    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    params = random_params(config, jnp.float32, quantization="int8")
    head = quantize(np.asarray(params["lm_head"]), bits=8, group_size=32, scale_dtype=jnp.float16)
    params["lm_head"] = jax.tree.map(jnp.asarray, head)
    run = lambda mode: prepare_packed_weights(config, params, backend="cpu", quantization=mode,
                                              matmul_backend=None, float_dtype=jnp.float32, head_dtype=jnp.float32)
    default = run(None)
    assert not isinstance(default.params["lm_head"], QuantizedWeight) and "lm_head expanded" in default.note
    np.testing.assert_array_equal(np.asarray(default.params["lm_head"]), np.asarray(dequantize(head)))
    assert isinstance(run("packed").params["lm_head"], QuantizedWeight)
