"""The quantizers (GPTQ, AWQ, RTN) on small matrices and tiny random models: the properties each method exists
for, checked against plain round to nearest, and the dense calibration forward against the engine's model."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import random_params
from jaxinfer.quantization.awq import GROUPS, awq_fake_quantize, awq_layer, fold_scale, search_scale
from jaxinfer.quantization.calibration import (calibration_samples, decoder_layer, dense_logits, embed,
                                               layer_weights, rope_for, run_layer)
from jaxinfer.quantization.gptq import Hessian, gptq
from jaxinfer.quantization.group_quant import rtn
from jaxinfer.quantization.pipeline import QuantizeSettings, quantize_params
from model_utils import prefill_logits

VALID_TXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, rope_theta=5000.0)
# One layer whose every linear is 64 x 64 (multi-head, intermediate = hidden): the quantizers compile once per shape,
# so the tests share one shape.
SQUARE = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                     head_dim=16, rope_theta=5000.0)


def _correlated_problem(K=64, N=64, T=1024, seed=0):
    """Inputs whose features are mixed (correlated) and of unequal size, as a real layer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
    x = (rng.standard_normal((T, K)) @ mix * (1 + 3 * rng.random(K))).astype(np.float32)
    return x, (rng.standard_normal((K, N)) * 0.05).astype(np.float32)


def _output_error(x, w, q):
    return float(np.sum((x @ w - x @ q.dequantize()) ** 2))


def test_dense_calibration_forward_matches_the_engine_model():
    """Calibration runs its own dense (non-paged) layer loop; it must compute the engine's function (here with
    tied embeddings, q/k/v biases and grouped-query attention)."""
    config = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True, "attention_bias": True})
    params = random_params(config, jnp.float32, seed=5, scale=0.1)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (3, 37)).astype(np.int32)
    dense = np.asarray(dense_logits(config, params, ids))
    for s in range(3):
        np.testing.assert_allclose(dense[s], prefill_logits(config, params, ids[s].tolist()), rtol=1e-4, atol=1e-5)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    x, w = _correlated_problem()
    h = Hessian(w.shape[0])
    for part in np.array_split(x, 3):  # accumulated over batches, as calibration does
        h.add(part)
    np.testing.assert_allclose(np.asarray(h.value), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-2)
    for bits, group_size in ((4, 32), (8, -1)):
        base = _output_error(x, w, rtn(w, bits, group_size))
        q, _ = gptq(w, h.value, bits=bits, group_size=group_size)
        ordered, _ = gptq(w, h.value, bits=bits, group_size=group_size, act_order=True)
        # measured: 0.50 and 0.33 of RTN's error
        assert _output_error(x, w, q) < 0.6 * base
        assert _output_error(x, w, ordered) < 0.8 * _output_error(x, w, q)


def test_gptq_without_correlations_is_round_to_nearest():
    """With H = I no row's error can be compensated elsewhere: GPTQ must reduce to RTN on the same grid."""
    _, w = _correlated_problem()
    for sym in (True, False):
        q, _ = gptq(w, np.eye(64, dtype=np.float32), bits=4, group_size=32, sym=sym)
        r = rtn(w, 4, 32, sym)
        np.testing.assert_array_equal(q.codes, r.codes)
        np.testing.assert_array_equal(q.scales, r.scales)
        np.testing.assert_array_equal(q.zeros, r.zeros)


def test_act_order_permutes_consistently():
    """Act-order visits inputs by decreasing H_kk. So the result may not depend on how the inputs are numbered:
    quantizing a row-permuted problem gives the same weight, permuted; and g_idx puts exactly group_size
    inputs in each group, in visiting order."""
    x, w = _correlated_problem()
    h = 2 * x.T @ x / len(x)
    q, _ = gptq(w, h, bits=4, group_size=32, act_order=True)
    order = np.argsort(-np.diag(h), kind="stable")
    np.testing.assert_array_equal(q.g_idx[order], np.arange(64) // 32)
    assert not np.array_equal(q.g_idx, np.arange(64) // 32)  # a real permutation
    perm = np.random.default_rng(3).permutation(64)
    p, _ = gptq(w[perm], h[perm][:, perm], bits=4, group_size=32, act_order=True)
    np.testing.assert_array_equal(p.codes, q.codes[perm])
    np.testing.assert_array_equal(p.g_idx, q.g_idx[perm])
    np.testing.assert_allclose(p.dequantize(), q.dequantize()[perm], rtol=1e-6)
    # IntWeight's g_idx-indexed scales are what the quantizer optimised: x @ dequantized equals row-wise codes
    k = 37
    g = q.g_idx[k]
    np.testing.assert_allclose(q.dequantize()[k], (q.codes[k].astype(np.float32) - q.zeros[g]) *
                               q.scales[g].astype(np.float32), rtol=1e-6)


def test_awq_scaling_cuts_the_error_from_salient_channels_and_folds_exactly():
    rng = np.random.default_rng(0)
    K, N = 64, 64
    x = rng.standard_normal((4, 64, K)).astype(np.float32)
    x[..., :4] *= 30  # a few input channels with large activations
    w_down = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w = {"w_down": jnp.asarray(w_down), "w_up": jnp.asarray(rng.standard_normal((64, K)), jnp.float32)}
    down = next(g for g in GROUPS if g.name == "down")
    s = search_scale(TINY, down, w, jnp.asarray(x), bits=4, group_size=32)
    flat = x.reshape(-1, K)

    def error(wq):
        return float(np.sum((flat @ w_down - flat @ np.asarray(wq)) ** 2))

    plain = error(awq_fake_quantize(jnp.asarray(w_down), 4, 32))
    scaled = error(awq_fake_quantize(jnp.asarray(w_down) * s[:, None], 4, 32) / s[:, None])
    assert scaled < 0.6 * plain  # measured 0.40
    assert float(jnp.min(s[:4])) > float(jnp.max(s[4:]))  # the salient channels get the largest scales
    folded = fold_scale(w, down, s)
    np.testing.assert_allclose(np.asarray(folded["w_up"] @ folded["w_down"]), np.asarray(w["w_up"] @ w["w_down"]),
                               rtol=1e-4, atol=1e-5)


def test_awq_layer_keeps_the_float_layer_and_beats_rtn():
    """All four scale groups (o <- v too: this config is multi-head) folded in, the float layer is unchanged;
    quantized, the layer's output error is below RTN's on AWQ's grid."""
    config = SQUARE
    params = random_params(config, jnp.float32, seed=2, scale=0.1)
    ids = np.random.default_rng(0).integers(0, 96, (4, 32)).astype(np.int32)
    x = embed(config, params, ids)
    x = x.at[..., :3].multiply(20.0)  # salient residual channels
    w = layer_weights(params, 0)
    out, inputs = run_layer(config, w, x, capture=True)
    folded, quantized = awq_layer(config, w, inputs, bits=4, group_size=32)
    assert not np.allclose(np.asarray(folded["attn_norm"]), np.asarray(w["attn_norm"]))
    assert not np.allclose(np.asarray(folded["wv"]), np.asarray(w["wv"]))  # o's scale went into v
    np.testing.assert_allclose(np.asarray(run_layer(config, folded, x)[0]), np.asarray(out), rtol=1e-3, atol=1e-4)

    def layer_error(ws):
        return float(jnp.sum((run_layer(config, ws, x)[0] - out) ** 2))

    awq = dict(folded, **{n: jnp.asarray(q.dequantize()) for n, q in quantized.items()})
    plain = dict(w, **{n: awq_fake_quantize(w[n], 4, 32) for n in quantized})
    assert layer_error(awq) < 0.8 * layer_error(plain)


def test_model_quantizers_rank_as_expected_on_a_tiny_model():
    """End to end through the layer loop: every method leaves the logits near the float ones, GPTQ nearer than
    RTN; quantized weights are what the params now hold."""
    config = SQUARE
    params = random_params(config, jnp.float32, seed=1)
    ids = np.random.default_rng(0).integers(0, 96, (4, 24)).astype(np.int32)
    ref = np.asarray(dense_logits(config, params, ids))
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        model = quantize_params(config, params, QuantizeSettings(method=method, group_size=32, calib="-"), ids,
                                progress=False)
        assert sorted(model.weights) == sorted(f"layers_{i}/{n}" for i in range(1) for n in
                                               ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
        np.testing.assert_array_equal(np.asarray(model.params["layers_0"]["w_up"]),
                                      model.weights["layers_0/w_up"].dequantize())
        errors[method] = float(np.mean((np.asarray(dense_logits(config, model.params, ids)) - ref) ** 2))
    assert errors["gptq"] < errors["rtn"], errors
    assert max(errors.values()) < 0.01 * float(np.mean(ref ** 2)), errors


def test_calibration_samples_are_seeded_windows_of_real_text(tokenizer):
    path = VALID_TXT
    a = calibration_samples(tokenizer, path, 6, 40, seed=1)
    assert a.shape == (6, 40) and a.dtype == np.int32
    np.testing.assert_array_equal(a, calibration_samples(tokenizer, path, 6, 40, seed=1))
    assert not np.array_equal(a, calibration_samples(tokenizer, path, 6, 40, seed=2))
    text = tokenizer.decode(a[0].tolist())
    with open(path, encoding="utf-8") as f:
        assert text.strip()[:30] in f.read()


@pytest.mark.parametrize("settings,message", [
    (dict(bits=3), "bits 3"), (dict(method="awq", bits=8, calib="x"), "--bits 8"),
    (dict(method="gptq"), "--calib"), (dict(method="rtn", act_order=True), "--act-order"),
    (dict(method="rtn", checkpoint_format="marlin"), "marlin")])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        QuantizeSettings(**settings)


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match="group_size=48 does not divide the input dimension 64"):
        rtn(np.zeros((64, 8), np.float32), 4, 48)


def test_decoder_layer_capture_is_the_input_of_each_linear():
    params = random_params(TINY, jnp.float32, seed=4, scale=0.1)
    w = layer_weights(params, 1)
    x = np.random.default_rng(2).standard_normal((1, 9, 64)).astype(np.float32)
    cos, sin = rope_for(TINY, 9)
    out, inputs = decoder_layer(TINY, w, jnp.asarray(x[0]), cos, sin)
    # the MLP's output recomputed from the captured inputs closes the residual sum
    mid = out - jnp.dot(inputs.down_in, w["w_down"])
    act = jnp.asarray(inputs.mlp_in) @ w["w_gate"]
    np.testing.assert_allclose(np.asarray(inputs.down_in),
                               np.asarray(act / (1 + jnp.exp(-act)) * (inputs.mlp_in @ w["w_up"])), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(mid), np.asarray(x[0] + inputs.o_in @ w["wo"]), rtol=1e-5, atol=1e-5)
