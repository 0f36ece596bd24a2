"""The planner against the article's worked figures, hand-computed values, and what the engine allocates.

The background article's calculators (weight GB per dtype, KV cache per sequence, ridge point) are checked
against the planner's exact figures, and its one wrong printed figure is pinned down: its KV example prints 0.50 GB
for Llama-3.1-70B at 4096 tokens, while its own formula with the 70B shapes (80 layers) gives 1.25 GiB; 0.50 GiB is
what the same formula gives with 32 layers, i.e. Llama-3.1-8B.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxinfer.config import load_preset
from jaxinfer.kv_budget import kv_budget_bytes, num_kv_blocks
from jaxinfer.planner import PlanRequest, custom_accelerator, plan
from jaxinfer.planner.weights import WeightFormat, weight_report

GiB, GB = 2**30, 1e9
CPU = custom_accelerator(24, 10, 0.094, platform="cpu", name="CPU")


def _article_kv_gib(num_layers, num_heads, head_dim, seq_len, batch_size, dtype_bytes=2):
    """The article's calc_kv_cache_memory_gb, re-typed: 2 (K, V) x heads x head_dim x seq x batch x layers x bytes."""
    return 2 * num_heads * head_dim * seq_len * batch_size * num_layers * dtype_bytes / 1024**3


# ------------------------------------------------------------------------------------- article figures

def test_h100_ridge_point_is_about_295_flop_per_byte():
    p = plan(PlanRequest(model="llama-3.1-8b", gpu="H100-SXM"))
    assert round(p["roofline"]["ridge_flops_per_byte"]) == 295  # 989.5 TFLOP/s dense bf16 / 3.35 TB/s
    assert p["roofline"]["ridge_flops_per_byte"] == pytest.approx(989e12 / 3.35e12, rel=1e-3)  # the article's


@pytest.mark.parametrize("preset, article_gb", [("llama-3.1-8b", {"float32": 32, "bfloat16": 16}),
                                                ("llama-3.1-70b", {"float32": 280, "bfloat16": 140}),
                                                ("mistral-7b", {"float32": 28, "bfloat16": 14})])
def test_float_weight_bytes_are_params_times_dtype_bytes(preset, article_gb):
    config = load_preset(preset)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        p = plan(PlanRequest(model=preset, weight_dtype=dtype, dtype=dtype))
        # config.num_params is an independent closed formula; the planner sums the parameter declarations
        assert p["model"]["num_params"] == config.num_params
        assert p["weights"]["total_bytes"] == config.num_params * size
        # The article's table rounds parameter counts to 8B / 70B / 7B (Mistral has 7.24B): within 4%.
        assert p["weights"]["total_bytes"] / GB == pytest.approx(article_gb[dtype], rel=0.04)


def test_int4_and_int8_bytes_count_packed_codes_scales_and_offsets():
    c = load_preset("llama-3.1-8b")
    d, q, kv, m, layers = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, \
        c.intermediate_size, c.num_layers
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, m), (d, m), (m, d)]  # wq wk wv wo gate up down: [K, N]
    heads = 2 * c.vocab_size * d * 2                       # embedding + LM head, bf16
    norms = (2 * layers + 1) * d * 2
    # int4, group 128, f16 scales, symmetric: K*N/2 bytes of codes + (K/128)*N*2 bytes of scales
    int4 = layers * sum(k * n // 2 + k // 128 * n * 2 for k, n in shapes)
    p = plan(PlanRequest(model="llama-3.1-8b", weight_dtype="int4", group_size=128))
    assert p["weights"]["total_bytes"] == int4 + heads + norms
    # asymmetric adds f32 offsets [K/128, N]; int8 per-channel stores K*N codes and one scale row
    asym = layers * sum(k // 128 * n * 4 for k, n in shapes)
    p = plan(PlanRequest(model="llama-3.1-8b", weight_dtype="int4", symmetric=False))
    assert p["weights"]["total_bytes"] == int4 + asym + heads + norms
    int8 = layers * sum(k * n + n * 2 for k, n in shapes)
    p = plan(PlanRequest(model="llama-3.1-8b", weight_dtype="int8", group_size=-1))
    assert p["weights"]["total_bytes"] == int8 + heads + norms
    # The article's INT4 row (4 GB: 8e9 x 0.5 bytes) counts every parameter as a 4-bit code; the real layout
    # adds f16 scales (1/64 byte per weight) and keeps the embedding and LM head (1.05 B parameters) in bf16.
    assert (int4 + heads + norms) / GB == pytest.approx(5.70, abs=0.01)


def test_packed_bytes_equal_what_quantize_stores():
    """Oracle: jaxinfer.quantization.quantize packing a real weight; sum of its leaves' bytes."""
    from jaxinfer.params import model_specs
    from jaxinfer.planner.weights import spec_bytes
    from jaxinfer.quantization import quantize
    from jaxinfer.config import ModelConfig

    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    rng = np.random.default_rng(0)
    for bits, gs, symmetric in ((4, 32, True), (4, 64, False), (8, 32, True), (8, -1, False)):
        fmt = WeightFormat(f"int{bits}", group_size=gs, symmetric=symmetric, scale_dtype="float32")
        for spec in model_specs(config):
            if spec.kind.value != "linear":
                continue
            packed = quantize(rng.standard_normal(spec.shape).astype(np.float32), bits=bits, group_size=gs,
                              symmetric=symmetric)
            assert spec_bytes(spec, fmt, config) == sum(x.nbytes for x in jax.tree_util.tree_leaves(packed))


def test_llama70b_kv_at_4096_tokens_is_1_25_gib_not_the_articles_0_50():
    p = plan(PlanRequest(model="llama-3.1-70b", max_model_len=8192, context_len=4096, batch_sizes=(1, 4, 8, 16, 32)))
    kv = p["kv_cache"]
    assert kv["bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv["bytes_per_sequence_at_context"] == 1.25 * GiB
    assert _article_kv_gib(80, 8, 128, 4096, 1) == 1.25     # the article's own formula with 70B's 80 layers
    assert _article_kv_gib(32, 8, 128, 4096, 1) == 0.50     # its printed 0.50: 32 layers, i.e. Llama-3.1-8B
    p8 = plan(PlanRequest(model="llama-3.1-8b", context_len=2048, max_model_len=4096))
    assert p8["kv_cache"]["bytes_per_token"] * 4096 == 0.5 * GiB
    # the article's batch table: KV grows linearly with the batch (1.25 GiB each, not 0.5 GB)
    rows = {r["tokens"]: r for r in p["roofline"]["decode"]}
    for b in (1, 4, 8, 16, 32):
        assert rows[b]["kv_bytes_per_device"] == b * 1.25 * GiB


# --------------------------------------------------------------------------------- hand-computed plans

def test_llama70b_on_four_h100_hand_computed():
    c = load_preset("llama-3.1-70b")
    d, i, v, layers = 8192, 28672, 128256, 80
    p = plan(PlanRequest(model="llama-3.1-70b", gpu="H100-SXM", tp=4, max_model_len=8192))
    per_layer = (2 * d * d + 2 * d * 1024 + 3 * d * i) // 4 * 2   # every linear split 4 ways, bf16
    heads = 2 * v * d // 4 * 2                                      # vocab-parallel embedding and LM head
    norms = (2 * layers + 1) * d * 2                               # replicated
    weights = layers * per_layer + heads + norms
    assert p["weights"]["per_device_bytes"] == weights
    assert p["weights"]["replicated_bytes_per_device"] == norms
    kv_token = 2 * layers * 2 * 128 * 2                            # 2 of the 8 KV heads per device
    assert p["kv_cache"]["bytes_per_token_per_device"] == kv_token
    budget = 80 * GiB * 0.75 * 0.9 - weights                       # JAX takes 75% of HBM; the engine 90% of it
    assert p["kv_cache"]["num_blocks"] == int(budget // (16 * kv_token))
    assert p["kv_cache"]["concurrent_sequences_at_context"] == p["kv_cache"]["num_blocks"] // (8192 // 16)
    assert p["memory"]["fits"]
    assert p["communication"]["allreduces_per_token"] == 2 * layers + 1
    assert p["communication"]["allreduce_payload_bytes_per_token"] == (2 * layers + 1) * d * 2
    # one H100 cannot hold 141 GB of bf16 weights
    assert not plan(PlanRequest(model="llama-3.1-70b", gpu="H100-SXM"))["memory"]["fits"]
    assert c.num_params * 2 == p["weights"]["total_bytes"]


def test_decode_at_batch_one_streams_the_weights_at_hbm_bandwidth():
    p = plan(PlanRequest(model="llama-3.1-8b", gpu="H100-SXM", context_len=16, batch_sizes=(1,)))
    row = p["roofline"]["decode"][0]
    streamed = p["weights"]["total_bytes"] - 128256 * 4096 * 2    # all but the gathered embedding table
    assert row["bytes_per_device"] == pytest.approx(streamed, rel=0.01)
    assert row["tokens_per_s"] == pytest.approx(3.35e12 / streamed, rel=0.01)
    assert row["bound"] == "memory" and row["intensity_flops_per_byte"] == pytest.approx(1.0, abs=0.05)


def test_prefill_flops_hand_computed():
    c = load_preset("smollm2-135m")
    d, i, hd, h, layers, prompt = 576, 1536, 64, 9, 30, 128
    p = plan(PlanRequest(model="smollm2-135m", gpu="H100-SXM", prompt_len=prompt, max_num_batched_tokens=512))
    linear = 2 * layers * (2 * d * h * hd + 2 * d * 3 * hd + 3 * d * i)
    attention = 4 * layers * h * hd * prompt * (prompt + 1) // 2  # causal: query j sees j + 1 keys
    head = 2 * d * c.vocab_size                                     # the LM head for the last token only
    assert p["roofline"]["prefill"]["flops_per_device"] == prompt * linear + attention + head


def test_compute_bound_batch_is_where_intensity_crosses_the_ridge():
    from jaxinfer.planner import roofline
    from jaxinfer.planner.hardware import get_accelerator

    config, gpu = load_preset("llama-3.1-8b"), get_accelerator("H100-SXM")
    fmt = WeightFormat("bfloat16")
    costs = roofline.stage_costs(config, weight_report(config, fmt), tp=1, pp=1, act_bytes=2, kv_dtype_bytes=2,
                                 head_dtype_bytes=2)
    ridge, peak = gpu.ridge_point("bf16"), gpu.peak_flops("bf16")
    for context in (1, 64):
        b = roofline.compute_bound_batch(costs, ridge, context)
        assert roofline.decode_step(costs, gpu, peak, 1, b, context).intensity >= ridge
        assert roofline.decode_step(costs, gpu, peak, 1, b - 1, context).intensity < ridge
    assert roofline.compute_bound_batch(costs, ridge, 4096) is None  # GQA attention: ~8 FLOP/byte at best


def test_tp_and_pp_split_heads_layers_and_replicate_what_cannot_split():
    base = plan(PlanRequest(model="smollm2-135m", gpu="L4"))["weights"]["total_bytes"]
    p = plan(PlanRequest(model="smollm2-135m", gpu="L4", tp=3))
    assert p["parallelism"]["kv_heads_per_device"] == 1 and not p["parallelism"]["kv_heads_replicated"]
    replicated = plan(PlanRequest(model="llama-3.1-8b", tp=16 // 2, pp=2))  # 8 KV heads, TP 8: split
    assert replicated["parallelism"]["kv_heads_per_device"] == 1
    # 8 KV heads at TP 16: each replicated over two KV slots, one slot per device (jaxinfer.sharding.head_layout)
    p16 = plan(PlanRequest(model="llama-3.1-70b", gpu="B200", tp=16))
    assert p16["parallelism"]["kv_heads_replicated"] and p16["parallelism"]["kv_heads_per_device"] == 1
    assert any("replicated" in n for n in p16["notes"])
    pp = plan(PlanRequest(model="smollm2-135m", gpu="L4", pp=2))
    assert pp["parallelism"]["stage_layers"] == [[0, 15], [15, 30]]
    lm_head, norm = 576 * 49152 * 2, 576 * 2
    # tied embeddings: the one [hidden, vocab] matrix is vocab-parallel over both stages; the final norm on both
    assert sum(pp["weights"]["per_stage_device_bytes"]) == base + norm
    assert pp["weights"]["per_stage_device_bytes"][0] == (base - lm_head - norm) // 2 + lm_head // 2 + norm
    assert pp["communication"]["p2p_bytes_per_token"] == 576 * 2
    # 9 query / 3 KV heads at TP 2: 12 query heads (3 zero) over 4 KV slots, 6 and 2 per device
    p2 = plan(PlanRequest(model="smollm2-135m", tp=2))["parallelism"]
    assert (p2["q_heads_per_device"], p2["kv_heads_per_device"], p2["query_heads_padded"]) == (6, 2, 3)
    with pytest.raises(ValueError, match="intermediate_size"):
        plan(PlanRequest(model="smollm2-135m", tp=5))  # MLP 1536
    with pytest.raises(ValueError, match="group size"):
        plan(PlanRequest(model="smollm2-135m", weight_dtype="int4", group_size=128))  # hidden 576


def test_kv_budget_formula_on_an_accelerator():
    stats = {"bytes_limit": 60 * GiB, "bytes_in_use": 10 * GiB}
    assert kv_budget_bytes(None, 0.9, stats) == 60 * GiB * 0.9 - 10 * GiB
    assert kv_budget_bytes(None, 0.9, None) == 2 * GiB          # CPU
    assert kv_budget_bytes(None, 0.9, None, num_devices=4) == GiB / 2  # CPU devices share the host's memory
    assert kv_budget_bytes(0.5, 0.9, stats) == 0.5 * GiB        # explicit budget wins
    assert num_kv_blocks(10 * 1000 + 999, 1000, 64, 16) == 10
    assert num_kv_blocks(-5.0, 1000, 100, 16) == 7               # never less than one max_model_len sequence


def test_cli_json_and_plot(tmp_path, capsys):
    from jaxinfer.cli import main

    png = tmp_path / "plan.png"
    main(["plan", "--model", "llama-3.1-70b", "--tp", "4", "--format", "json", "--plot", str(png)])
    p = json.loads(capsys.readouterr().out)
    assert p["parallelism"]["tp"] == 4 and png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["plan", "--model", "no-such-model"])
    # the planner itself does not need matplotlib (only --plot imports it)
    check = "import sys; from jaxinfer.cli import main; main(['plan']); assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


# ------------------------------------------------------------------------ against the engine's arrays

def _array_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_plan_equals_engine_allocation_fixed_blocks(llm, gguf_path):
    from tests.conftest import SMALL_ENGINE

    runner = llm.engine.runner
    p = plan(PlanRequest(model=gguf_path, gpu=CPU, weight_dtype=SMALL_ENGINE["weight_dtype"], dtype="float32",
                         max_model_len=SMALL_ENGINE["max_model_len"], num_kv_blocks=SMALL_ENGINE["num_kv_blocks"]))
    assert p["weights"]["per_device_bytes"] == _array_bytes(runner.params)
    assert p["kv_cache"]["allocated_bytes_per_device"] == _array_bytes(runner.kv_cache)
    assert p["kv_cache"]["num_blocks"] == runner.num_blocks


def test_plan_equals_engine_allocation_from_the_memory_budget():
    from jaxinfer.engine import LLMEngine

    engine = LLMEngine(model="random:smollm2-135m", weight_dtype="bfloat16", dtype="float32",
                       kv_cache_memory_gb=0.03, max_model_len=300, verbose=False)
    p = plan(PlanRequest(model="random:smollm2-135m", gpu=CPU, weight_dtype="bfloat16", dtype="float32",
                         kv_cache_memory_gb=0.03, max_model_len=300))
    runner = engine.runner
    assert p["weights"]["head_dtype"] == "float32"  # the engine keeps the LM head at the activation dtype
    assert p["weights"]["per_device_bytes"] == _array_bytes(runner.params)
    assert p["kv_cache"]["num_blocks"] == runner.num_blocks == int(0.03 * GiB // (16 * 30 * 2 * 3 * 64 * 4))
    assert p["kv_cache"]["allocated_bytes_per_device"] == _array_bytes(runner.kv_cache)


# Per-device bytes against the engine's own placement on 8 virtual CPU devices: tests/multidevice/test_planner_layout.py
