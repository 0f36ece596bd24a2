"""XLA formulations of the packed matmul (jaxinfer.quantization.xla_matmul) against a numpy oracle: the weight
dequantized by hand from its unsigned codes (W = u * scale + offset), then an f64 dot.

Tolerances, as max|y - ref| / max|ref|: "dequantize" 1e-5 (same weight, f32 arithmetic). The int8-activation
formulations round each activation to 1/254 of its row's (or row group's) largest magnitude, so they carry an
error of that order: 1.5e-2 on Gaussian activations; they must also be far better than the error a wrong scale or
group mapping would cause (the test with a swapped group shows that error is O(1))."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quantization import QuantLayout, dequantize, quantize, unpack_int4
from jaxinfer.quantization.weight import dequantize_columns
from jaxinfer.quantization.xla_matmul import (ACTIVATION_QUANTIZING, FORMULATIONS, QuantMatmulPlan, applicable,
                                              cpu_compiler_options, xla_quant_matmul)

K, N = 256, 48


def oracle_weight(w) -> np.ndarray:
    """float64 W [K, N] from the stored arrays, by hand: u from the storage, then u * s + b per group."""
    qw = np.asarray(w.qweight)
    u = unpack_int4(qw).astype(np.float64) if w.bits == 4 else qw.astype(np.int64) + 128.0
    s = np.repeat(np.asarray(w.scales, np.float64), w.group_size, axis=0)
    b = (np.repeat(np.asarray(w.offsets, np.float64), w.group_size, axis=0) if w.offsets is not None
         else -(2.0 ** (w.bits - 1)) * s)
    dense = u * s + b
    if w.perm is not None:  # stored rows are W[perm]
        out = np.empty_like(dense)
        out[np.asarray(w.perm)] = dense
        dense = out
    return dense


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.abs(y - ref).max() / np.abs(ref).max()


PACKINGS = {  # name: quantize() arguments (+ an act-order permutation, f16 offsets as GGUF Q4_1 stores them)
    "int8 per-channel": dict(bits=8, group_size=None, symmetric=True),
    "int8 per-channel asym": dict(bits=8, group_size=None, symmetric=False),
    "int4 per-channel": dict(bits=4, group_size=None, symmetric=True),
    "int8 g32 (Q8_0)": dict(bits=8, group_size=32, symmetric=True, scale_dtype=jnp.float16),
    "int4 g32 f16 min (Q4_1)": dict(bits=4, group_size=32, symmetric=False, scale_dtype=jnp.float16, f16_min=True),
    "int4 g64 act-order": dict(bits=4, group_size=64, symmetric=False, perm=True),
    "int4 g128 sym": dict(bits=4, group_size=128, symmetric=True, scale_dtype=jnp.bfloat16),
}


def make(name, seed=0):
    args = dict(PACKINGS[name])
    f16_min, perm = args.pop("f16_min", False), args.pop("perm", False)
    rng = np.random.default_rng(seed)
    w = quantize(rng.standard_normal((K, N)) * 0.1, **args)
    if f16_min:
        w = dataclasses.replace(w, offsets=np.asarray(w.offsets, np.float16))
    if perm:
        w = dataclasses.replace(w, perm=rng.permutation(K).astype(np.int32))
    return w


@pytest.mark.parametrize("name", sorted(PACKINGS))
@pytest.mark.parametrize("rows", [2, 16])
def test_formulations_match_the_oracle(name, rows):
    w = make(name)
    ref_w = oracle_weight(w)
    np.testing.assert_allclose(np.asarray(dequantize(w)), ref_w, rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
    ref = x.astype(np.float64) @ ref_w
    ran = []
    for form in FORMULATIONS:
        if not applicable(form, QuantLayout.of(w), K):
            continue
        ran.append(form)
        y = jax.jit(lambda x, w, form=form: xla_quant_matmul(x, w, form))(x, w)
        assert y.shape == (rows, N) and y.dtype == jnp.float32
        assert rel_err(y, ref) < (1.5e-2 if form in ACTIVATION_QUANTIZING else 1e-5), form
    # every packing has one int8-activation formulation (and the native kernel where it is built)
    assert "dequantize" in ran and len([f for f in ran if f in ACTIVATION_QUANTIZING]) == 1


def test_a_wrong_group_mapping_would_be_caught():
    """The int8 formulations' tolerance is far below the error of misapplied scales (so the test above bites)."""
    w = make("int4 g32 f16 min (Q4_1)")
    x = np.random.default_rng(3).standard_normal((4, K)).astype(np.float32)
    shifted = dataclasses.replace(w, scales=np.roll(np.asarray(w.scales), 1, axis=0))
    assert rel_err(xla_quant_matmul(x, shifted, "group_int8_dot"), x @ oracle_weight(w)) > 0.1


def test_under_the_cpu_compiler_options_results_are_unchanged():
    w, x = make("int8 g32 (Q8_0)"), np.random.default_rng(4).standard_normal((2, K)).astype(np.float32)
    options = dict(cpu_compiler_options())
    for form in ("dequantize", "group_int8_dot"):
        f = lambda x, w, form=form: xla_quant_matmul(x, w, form)
        plain = jax.jit(f)(x, w)
        fused = jax.jit(f, compiler_options=options or None)(x, w)
        np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_bf16_activations_and_leading_dims():
    w = make("int4 g64 act-order")
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    y = xla_quant_matmul(jnp.asarray(x, jnp.bfloat16), w, "dequantize")
    assert y.shape == (2, 3, N) and y.dtype == jnp.bfloat16
    assert rel_err(np.asarray(y, np.float32).reshape(6, N), x.reshape(6, K) @ oracle_weight(w)) < 2e-2


@pytest.mark.parametrize("name", ["int4 g32 f16 min (Q4_1)", "int8 g32 (Q8_0)", "int4 g64 act-order"])
def test_token_lookup_dequantizes_only_the_gathered_columns(name):
    w = make(name)
    ids = jnp.asarray([5, 0, 47, 5, 13], jnp.int32)
    rows = jax.jit(dequantize_columns)(w, ids)
    np.testing.assert_allclose(np.asarray(rows), oracle_weight(w)[:, np.asarray(ids)].T, rtol=1e-6, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(dequantize_columns)(w, ids))
    assert f"f32[{K},{N}]" not in jaxpr  # the full float matrix is never built


def test_plan_picks_by_rows_and_falls_back_where_a_formulation_does_not_apply():
    plan = QuantMatmulPlan(grouped=((8, "group_int8_dot"), (2**31, "dequantize")),
                           per_channel=((2**31, "int8_dot"),))
    grouped = QuantLayout.of(make("int4 g32 f16 min (Q4_1)"))
    per_channel = QuantLayout.of(make("int8 per-channel"))
    assert plan.pick(2, grouped, K) == "group_int8_dot" and plan.pick(8, grouped, K) == "group_int8_dot"
    assert plan.pick(9, grouped, K) == "dequantize" and plan.pick(4096, per_channel, K) == "int8_dot"
    mixed = QuantMatmulPlan(grouped=((2**31, "int8_dot"),))  # int8_dot needs one group per column
    assert mixed.pick(2, grouped, K) == "dequantize"
    assert "group_int8_dot" in plan.describe()
    with pytest.raises(ValueError, match="unknown quantized matmul formulation"):
        xla_quant_matmul(np.ones((2, K), np.float32), make("int8 per-channel"), "fused_magic")


def test_the_heads_plan_is_exact_and_says_where_a_formulation_always_runs():
    plan = QuantMatmulPlan(grouped=((8, "cpu_kernel"), (2**31, "group_int8_dot")), per_channel=((2**31, "int8_dot"),))
    grouped = QuantLayout.of(make("int8 g32 (Q8_0)"))
    exact = plan.exact()  # what the LM head runs: no activation quantization
    assert exact.grouped == ((8, "cpu_kernel"), (2**31, "dequantize")) and exact.per_channel == ((2**31, "dequantize"),)
    assert plan.uses("cpu_kernel") and not plan.uses("dequantize")
    assert not exact.always("cpu_kernel", grouped, K)
    everywhere = QuantMatmulPlan(grouped=((8, "cpu_kernel"), (2**31, "cpu_kernel")))
    assert everywhere.always("cpu_kernel", grouped, K) == applicable("cpu_kernel", grouped, K)
    assert not everywhere.always("cpu_kernel", QuantLayout.of(make("int8 per-channel")), K)  # the other table
