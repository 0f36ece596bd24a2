"""The CPU weight-dtype default is chosen from what this machine measures (jaxinfer/cpu_probe.py): the rule on
hand-given timings of both kinds of machine seen, the per-machine cache, a real (tiny) measurement, and the engine
using the choice unless weight_dtype= overrides it."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxinfer import cpu_probe
from jaxinfer.config import ModelConfig

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8)


def _seconds(f32, bf16):
    return {"float32": dict(zip(cpu_probe.PROBE_ROWS, f32)), "bfloat16": dict(zip(cpu_probe.PROBE_ROWS, bf16))}


def test_rule_on_both_kinds_of_machine():
    # AVX2-only EPYC (issue 9's decode_step figures, ms at 2 / 32 sequences): bf16 slower at 2 rows -> f32
    assert cpu_probe.decide(_seconds((50.9, 249.5), (71.2, 257.7)), 10**9, 2**34).dtype == "float32"
    # AVX-512 + avx512_bf16 EPYC: bf16 1.4-2x faster at every row count -> bf16
    assert cpu_probe.decide(_seconds((46.0, 120.0), (30.0, 80.0)), 10**9, 2**34).dtype == "bfloat16"
    # faster at batch but slower single-stream: f32 (interactive latency matters and f32 is exact)
    assert cpu_probe.decide(_seconds((50.0, 250.0), (60.0, 150.0)), 10**9, 2**34).dtype == "float32"
    # a near tie goes to f32
    assert cpu_probe.decide(_seconds((50.0, 250.0), (49.0, 245.0)), 10**9, 2**34).dtype == "float32"
    # f32 weights that would not fit in memory: bf16 whatever the speed, and the reason says so
    choice = cpu_probe.decide(_seconds((50.9, 249.5), (71.2, 257.7)), 10 * 2**30, 16 * 2**30)
    assert choice.dtype == "bfloat16" and "memory" in choice.reason


def test_choice_is_measured_once_per_machine_and_shape(tmp_path):
    calls = []

    def fake_measure(shapes, num_layers):
        calls.append((tuple(sorted(shapes.items())), num_layers))
        return _seconds((1.0, 2.0), (0.5, 1.0))

    first = cpu_probe.choose_weight_dtype(SMALL, cache_dir=str(tmp_path), measure=fake_measure)
    again = cpu_probe.choose_weight_dtype(SMALL, cache_dir=str(tmp_path), measure=fake_measure)
    assert (first.dtype, first.cached, again.dtype, again.cached) == ("bfloat16", False, "bfloat16", True)
    assert len(calls) == 1
    wider = ModelConfig(**{**SMALL.__dict__, "intermediate_size": 128})
    cpu_probe.choose_weight_dtype(wider, cache_dir=str(tmp_path), measure=fake_measure)
    assert len(calls) == 2 and dict(calls[1][0])["w_down"] == (128, 32)


def test_real_measurement_times_both_dtypes():
    seconds = cpu_probe.measure_weight_dtypes(cpu_probe.layer_matmul_shapes(SMALL), SMALL.num_layers, runs=2)
    assert set(seconds) == {"float32", "bfloat16"}
    assert all(set(v) == set(cpu_probe.PROBE_ROWS) and min(v.values()) > 0 for v in seconds.values())


@pytest.mark.parametrize("override", [None, "float32", "bfloat16"])
def test_engine_uses_the_choice_unless_overridden(monkeypatch, override):
    from jaxinfer.engine import EngineArgs, LLMEngine

    measured = []
    monkeypatch.setattr(cpu_probe, "choose_weight_dtype",
                        lambda config: measured.append(config) or cpu_probe.DtypeChoice("float32", "test"))
    engine = LLMEngine(EngineArgs(model="random:smollm2-135m", weight_dtype=override, num_kv_blocks=64,
                                  max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, verbose=False))
    assert engine.runner.params["layers_0"]["wq"].dtype == jnp.dtype(override or "float32")
    assert len(measured) == (0 if override else 1)


def _quant_seconds(**by_candidate):
    return {k.replace("__", ":"): dict(zip(cpu_probe.PROBE_ROWS, v)) for k, v in by_candidate.items()}


def test_packed_weights_rule_and_plan():
    """Packed as loaded when it keeps up with float (x1.05 in the geometric mean over the probed row counts),
    else int8 per channel when that does, else float; the plan takes the fastest formulation per row count, among
    those that quantize activations (W8A8) only when allowed."""
    small, large = cpu_probe.PROBE_ROWS
    s = _quant_seconds(float=(10.0, 40.0), packed__dequantize=(10.2, 41.0), packed__group_int8_dot=(8.0, 60.0),
                       int8__dequantize=(20.0, 39.0), int8__int8_dot=(7.0, 50.0))
    exact = cpu_probe.decide_quant(s, grouped=True, float_bytes=10**9, available_bytes=2**34)
    assert exact.action == "packed" and {f for _, f in exact.plan.grouped} == {"dequantize"}
    w8a8 = cpu_probe.decide_quant(s, True, 10**9, 2**34, w8a8=True)
    assert w8a8.plan.grouped[0][1] == "group_int8_dot" and w8a8.plan.grouped[-1][1] == "dequantize"
    assert small <= w8a8.plan.grouped[0][0] < large  # the bound lies between the probed row counts
    slower = {**s, "packed:dequantize": {small: 30.0, large: 45.0}, "packed:group_int8_dot": {small: 12.0, large: 60.0}}
    assert cpu_probe.decide_quant(slower, True, 10**9, 2**34).action == "float"  # exact int8 is slower too
    assert cpu_probe.decide_quant(slower, True, 10**9, 2**34, w8a8=True).action == "int8"
    faster_int8 = {**slower, "int8:dequantize": {small: 9.0, large: 39.0}}
    assert cpu_probe.decide_quant(faster_int8, True, 10**9, 2**34).action == "int8"
    # float weights that would not fit: packed whatever the speed
    choice = cpu_probe.decide_quant(slower, True, 10 * 2**30, 16 * 2**30)
    assert choice.action == "packed" and "memory" in choice.reason


def test_a_packed_head_stays_packed_only_where_the_native_kernel_keeps_up(tmp_path, monkeypatch):
    """The head is measured once per machine and layout (cached); kept packed when the kernel takes at most
    x1.05 the float time in the geometric mean over the probed row counts; never when the kernel is unavailable
    here."""
    from jaxinfer.native import quant_matmul_cpu
    from jaxinfer.quantization import QuantLayout

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    layout = QuantLayout(8, 32, "float16", None, False)
    calls = []

    def measure(timings):
        def fake(hidden, vocab, layout, float_dtype):
            calls.append((hidden, vocab))
            return {"float": dict(zip(cpu_probe.PROBE_ROWS, (10.0, 40.0))),
                    "cpu_kernel": dict(zip(cpu_probe.PROBE_ROWS, timings))}
        return fake

    monkeypatch.setattr(quant_matmul_cpu, "available", lambda: True)
    monkeypatch.setattr(quant_matmul_cpu, "identity", lambda: "test")
    keep, why = cpu_probe.keep_head_packed(config, layout, "float32", str(tmp_path), measure((3.0, 42.0)))
    assert keep and "2 rows 0.30x" in why
    assert cpu_probe.keep_head_packed(config, layout, "float32", str(tmp_path), measure((1.0, 1.0)))[0]  # cached
    assert calls == [(32, 64)]
    slow = QuantLayout(4, 32, "float16", "float16", False)
    assert not cpu_probe.keep_head_packed(config, slow, "float32", str(tmp_path), measure((12.0, 43.0)))[0]
    monkeypatch.setattr(quant_matmul_cpu, "available", lambda: False)
    assert not cpu_probe.keep_head_packed(config, layout, "float32", str(tmp_path / "x"), measure((1.0, 1.0)))[0]


def test_keeping_up_is_the_geometric_mean_over_the_probed_rows():
    """A packing far faster at decode's few rows and a little slower at a batch keeps up; one far slower at few
    rows does not, whatever it gains at a batch."""
    assert cpu_probe.keeps_up({2: 0.37, 32: 1.07}) and cpu_probe.keeps_up({2: 1.05, 32: 1.05})
    assert not cpu_probe.keeps_up({2: 3.0, 32: 0.5}) and not cpu_probe.keeps_up({2: 1.1, 32: 1.06})
