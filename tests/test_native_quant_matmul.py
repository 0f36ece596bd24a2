"""The native CPU kernel for packed matmuls (jaxinfer/native) against the numpy oracle of
test_xla_quant_matmul (each weight dequantized by hand from its stored codes, then an f64 dot): every packing the
engine loads, row counts that take each of the kernel's row-blocking paths, narrow and wide outputs (whole-row
tiles split by groups, and column tiles), and batch invariance. Needs x86-64 with AVX2 + FMA + F16C and a C++
compiler, like the engine's use of it; elsewhere the tests say why they skip."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.native import quant_matmul_cpu
from jaxinfer.quantization import QuantLayout, quantize
from jaxinfer.quantization.xla_matmul import applicable, xla_quant_matmul
from tests.test_xla_quant_matmul import PACKINGS, make, oracle_weight, rel_err

pytestmark = pytest.mark.skipif(not quant_matmul_cpu.available(), reason=quant_matmul_cpu.status()[1])
kernel = jax.jit(lambda x, w: xla_quant_matmul(x, w, "cpu_kernel"))


@pytest.mark.parametrize("name", sorted(PACKINGS))
@pytest.mark.parametrize("rows", [1, 2, 3, 7])  # 7 = a block of 4 rows, one of 2, one single row
def test_every_packing_matches_the_oracle(name, rows):
    w = make(name)
    assert applicable("cpu_kernel", QuantLayout.of(w), w.shape[0])
    x = np.random.default_rng(rows).standard_normal((rows, w.shape[0])).astype(np.float32)
    y = kernel(x, w)
    assert y.shape == (rows, w.shape[1]) and y.dtype == jnp.float32
    assert rel_err(y, x.astype(np.float64) @ oracle_weight(w)) < 1e-5


@pytest.mark.parametrize("n", [16, 2064])  # one strip; past the whole-row limit, with a narrow last column tile
@pytest.mark.parametrize("spec", [dict(bits=4, group_size=32, symmetric=False),
                                  dict(bits=8, group_size=None, symmetric=True, scale_dtype=jnp.float16)])
def test_output_widths(n, spec):
    rng = np.random.default_rng(n)
    w = jax.tree.map(jnp.asarray, quantize(rng.standard_normal((128, n)) * 0.1, **spec))
    x = rng.standard_normal((5, 128)).astype(np.float32)
    assert rel_err(kernel(x, w), x.astype(np.float64) @ oracle_weight(w)) < 1e-5


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    """Bit for bit: the engine's outputs must not change with what else is in the batch."""
    w = make("int4 g32 f16 min (Q4_1)")
    x = np.random.default_rng(9).standard_normal((6, w.shape[0])).astype(np.float32)
    alone = np.concatenate([np.asarray(kernel(x[i:i + 1], w)) for i in range(6)])
    for rows in (2, 4, 5, 6):
        np.testing.assert_array_equal(np.asarray(kernel(x[:rows], w)), alone[:rows])


def test_a_wrong_scale_would_be_caught():
    w = make("int8 g32 (Q8_0)")
    x = np.random.default_rng(3).standard_normal((2, w.shape[0])).astype(np.float32)
    shifted = dataclasses.replace(w, scales=np.roll(np.asarray(w.scales), 1, axis=0))
    assert rel_err(kernel(x, shifted), x @ oracle_weight(w)) > 0.1


def test_an_output_dim_off_the_strips_falls_back_to_dequantize():
    rng = np.random.default_rng(1)
    w = jax.tree.map(jnp.asarray, quantize(rng.standard_normal((64, 40)) * 0.1, bits=4, group_size=32))
    assert not quant_matmul_cpu.supports(4, 32, 40)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert rel_err(kernel(x, w), x @ oracle_weight(w)) < 1e-5
    assert "jaxinfer_quant_matmul" not in jax.jit(lambda x: xla_quant_matmul(x, w, "cpu_kernel")).lower(x).as_text()


def test_bf16_activations_and_leading_dims():
    w = make("int4 g64 act-order")
    x = np.random.default_rng(5).standard_normal((2, 3, w.shape[0])).astype(np.float32)
    y = xla_quant_matmul(jnp.asarray(x, jnp.bfloat16), w, "cpu_kernel")
    assert y.shape == (2, 3, w.shape[1]) and y.dtype == jnp.bfloat16
    assert rel_err(np.asarray(y, np.float32).reshape(6, -1), x.reshape(6, -1) @ oracle_weight(w)) < 2e-2


def test_without_the_cpu_features_a_compiler_or_permission_it_is_unavailable(monkeypatch, tmp_path):
    """Each reason the kernel cannot run is a clean "unavailable" with the reason (the XLA formulations then
    run); nothing raises."""
    monkeypatch.setenv("JAXINFER_CPU_KERNEL", "0")
    assert quant_matmul_cpu._load() == (False, "turned off by JAXINFER_CPU_KERNEL=0")
    monkeypatch.delenv("JAXINFER_CPU_KERNEL")
    from jaxinfer import cpu_probe

    monkeypatch.setattr(cpu_probe, "cpu_info", lambda: ("a CPU", {"avx2", "sse2"}))
    assert quant_matmul_cpu._load() == (False, "this CPU lacks fma, f16c")
    monkeypatch.undo()
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    available, why = quant_matmul_cpu._load()
    assert not available and why.startswith("building it failed")


@pytest.mark.slow
def test_the_default_model_through_the_kernel_answers_as_hf(llm, hf_model, tokenizer, monkeypatch):
    """SmolLM2's Q4_1 / Q8_0 blocks kept packed, every matmul and the tied head through the kernel (the plan
    forced, whatever this machine's probe would pick): HF fp32's greedy answer to the quickstart question, token
    for token, and the float engine's logprobs (the same weights, expanded) to 1e-3."""
    import torch

    from conftest import SMALL_ENGINE
    from jaxinfer import LLM, SamplingParams, cpu_probe
    from jaxinfer.quantization import QuantizedWeight
    from jaxinfer.quantization.xla_matmul import QuantMatmulPlan
    from test_hf_parity import CHAT_PROMPTS

    plan = QuantMatmulPlan(grouped=((2**31, "cpu_kernel"),), per_channel=((2**31, "cpu_kernel"),))
    monkeypatch.setattr(cpu_probe, "choose_quant_matmul",
                        lambda *a, **k: cpu_probe.QuantChoice("packed", plan, "forced by the test"))
    packed = LLM("smollm2-135m", **{**SMALL_ENGINE, "quantization": "packed"})
    params = packed.engine.runner.params
    assert isinstance(params["layers_0"]["wq"], QuantizedWeight) and isinstance(params["lm_head"], QuantizedWeight)
    assert packed.engine.runner.model.quant_plan == plan

    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[0]}])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    out = packed.generate([ids], SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert out.token_ids == ref and out.text.startswith("The capital of France is Paris.")

    greedy = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)
    prompt = "The history of the printing press begins"
    mine, theirs = packed.generate([prompt], greedy)[0], llm.generate([prompt], greedy)[0]
    assert mine.token_ids == theirs.token_ids
    for a, b, t in zip(mine.logprobs, theirs.logprobs, mine.token_ids):
        assert abs(a[t] - b[t]) < 1e-3


def test_mismatched_scales_are_refused_by_the_kernel():
    """The kernel checks what it is handed (Python normally guarantees it): wrong scale shapes are an error, not
    an out-of-bounds read."""
    w = make("int8 g32 (Q8_0)")
    x = np.ones((2, w.shape[0]), np.float32)
    short = dataclasses.replace(w, scales=np.asarray(w.scales)[:-1])
    with pytest.raises(Exception, match="scales"):
        jax.block_until_ready(jax.jit(quant_matmul_cpu.quant_matmul)(x, short))
