"""Cost of one jitted decode step of SmolLM2-135M (XLA attention path) by batch size and context, against the
matmul roofline measured in the same run (the step's matmul FLOPs at the machine's measured dot rate for that
weight dtype). Shows how much of a step the paged attention costs.

With --variants it instead compares weight forms in one run, interleaved, at each batch and context: random
float weights ("f32", "bf16", the LM head at --head-dtype) and the real default model's weights as the engine
holds them ("gguf-packed": the Q4_1 / Q8_0 blocks as stored; "gguf-int8": layer weights re-quantized to int8
per channel; "gguf-f32": dequantized), each with the XLA formulations and compiler options the engine picks
(jaxinfer.quantization.runtime), and the weight bytes read per step.

    python benchmarks/decode_step.py [--batches 8,32,64] [--contexts 8,150]
    python benchmarks/decode_step.py --variants f32,bf16,gguf-packed,gguf-int8 --batches 2,8,32 --contexts 150
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAXINFER_QUIET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an uninstalled jaxinfer

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.batch import SeqChunk, build_step_batch  # noqa: E402
from jaxinfer.config import load_preset  # noqa: E402
from jaxinfer.loaders.common import random_params  # noqa: E402
from jaxinfer.model import LlamaModel, init_kv_cache  # noqa: E402


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dot_rate(m: int, weight_dtype) -> float:
    """FLOP/s of an [m, 576] x [576, 49152] dot in the engine's form: activations cast to the weight dtype, f32
    accumulation."""
    x, w = jnp.ones((m, 576)), jnp.ones((576, 49152), weight_dtype)
    f = jax.jit(lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32))
    f(x, w).block_until_ready()
    return 2 * m * 576 * 49152 / timed(lambda: f(x, w), 10)


def variant_model(name: str, config, head_dtype):
    """(params, LlamaModel, compiler options, note) for one --variants entry."""
    from jaxinfer.loaders import open_checkpoint
    from jaxinfer.quantization.runtime import prepare_packed_weights

    if name in ("f32", "bf16"):
        dtype = jnp.float32 if name == "f32" else jnp.bfloat16
        return random_params(config, dtype, head_dtype=head_dtype), LlamaModel(config), None, ""
    mode = {"gguf-packed": "packed", "gguf-int8": "packed", "gguf-f32": "dequantize"}[name]
    checkpoint = open_checkpoint("smollm2-135m")
    params = checkpoint.load(jnp.float32, head_dtype, mode)
    if name == "gguf-int8":
        from jaxinfer.quantization.runtime import transcode_int8

        params = transcode_int8(checkpoint.config, params)
    rt = prepare_packed_weights(checkpoint.config, params, backend="cpu", quantization="packed",
                                matmul_backend="xla", float_dtype=jnp.float32, head_dtype=head_dtype)
    from jaxinfer.quantization.weight import packing_of

    model = LlamaModel(checkpoint.config, packing=packing_of(rt.params), quant_plan=rt.plan)
    return rt.params, model, rt.compiler_options, rt.plan.describe() if rt.plan else ""


def compare_variants(a, config) -> None:
    from jaxinfer.loaders.common import params_nbytes

    block = 16
    models = {}
    for name in a.variants.split(","):
        params, model, options, note = variant_model(name, config, jnp.dtype(a.head_dtype))
        step = jax.jit(lambda p, kv, b, model=model: model.apply({"params": p}, kv, b), donate_argnums=1,
                       compiler_options=options)
        models[name] = (params, step)
        print(f"- {name}: {params_nbytes(params) / 2**20:.1f} MiB of weights" + (f"; {note}" if note else ""))
    print("| sequences | mean context | " + " | ".join(f"{n} ms/step" for n in models) + " | " +
          " | ".join(f"{n} tok/s" for n in models) + " |")
    print("|---|---|" + "---|" * (2 * len(models)))
    for batch in [int(b) for b in a.batches.split(",")]:
        for ctx in [int(c) for c in a.contexts.split(",")]:
            lens = [ctx] * batch if ctx <= 16 else np.linspace(16, 2 * ctx - 16, batch).astype(int).tolist()
            per_seq = (max(lens) + block) // block + 1
            num_blocks = batch * per_seq + 1
            chunks = [SeqChunk([5], n, list(range(i * per_seq, (i + 1) * per_seq))) for i, n in enumerate(lens)]
            b = build_step_batch(chunks, num_tokens=batch, num_seqs=batch, max_blocks=128, block_size=block,
                                 num_blocks=num_blocks)
            caches = {n: [init_kv_cache(config, num_blocks, block, jnp.float32)] for n in models}

            def runner(n):
                params, step = models[n]

                def run():
                    logits, caches[n][0] = step(params, caches[n][0], b)
                    return logits
                return run

            times = {n: [] for n in models}
            for n in models:
                runner(n)()  # compile
            for _ in range(a.runs):  # interleaved: load changes hit every variant alike
                for n in models:
                    times[n].append(timed(runner(n), 1))
            med = {n: statistics.median(t) for n, t in times.items()}
            print(f"| {batch} | {np.mean(lens):.0f} | " + " | ".join(f"{med[n] * 1e3:.1f}" for n in models) + " | "
                  + " | ".join(f"{batch / med[n]:.1f}" for n in models) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--contexts", default="8,150", help="mean context; contexts spread from 16 to 2*mean-16")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="stored layer weights (the engine's default is bfloat16; activations and KV stay float32)")
    p.add_argument("--head-dtype", default="float32", choices=("bfloat16", "float32"),
                   help="embedding / LM head (the engine keeps them at the activation dtype, float32 on CPU)")
    p.add_argument("--variants", default=None, help="compare weight forms: f32,bf16,gguf-packed,gguf-int8,gguf-f32")
    a = p.parse_args()
    weight_dtype = jnp.dtype(a.weight_dtype)
    config = load_preset("smollm2-135m")
    if a.variants:
        print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
              f"model smollm2-135m, f32 activations and KV, {a.head_dtype} LM head for the random-weight variants")
        compare_variants(a, config)
        print(f"load average {os.getloadavg()[0]:.1f} at end")
        return
    params = random_params(config, weight_dtype, head_dtype=jnp.dtype(a.head_dtype))
    model = LlamaModel(config)
    step = jax.jit(lambda p, kv, b: model.apply({"params": p}, kv, b), donate_argnums=1)
    block = 16
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; model smollm2-135m, random "
          f"{a.weight_dtype} weights, {a.head_dtype} embedding and LM head, float32 activations and KV")
    print("| sequences | mean context | ms/step (median) | tok/s | matmul roofline ms | step / roofline |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in a.batches.split(",")]:
        rate = dot_rate(batch, weight_dtype)
        roofline = 2 * config.num_params * batch / rate
        for ctx in [int(c) for c in a.contexts.split(",")]:
            lens = [ctx] * batch if ctx <= 16 else np.linspace(16, 2 * ctx - 16, batch).astype(int).tolist()
            per_seq = (max(lens) + block) // block + 1
            num_blocks = batch * per_seq + 1
            chunks = [SeqChunk([5], n, list(range(i * per_seq, (i + 1) * per_seq))) for i, n in enumerate(lens)]
            b = build_step_batch(chunks, num_tokens=batch, num_seqs=batch, max_blocks=128, block_size=block,
                                 num_blocks=num_blocks)
            kv = [init_kv_cache(config, num_blocks, block, jnp.float32)]

            def run():
                logits, kv[0] = step(params, kv[0], b)
                return logits

            run()
            t = timed(run, a.runs)
            print(f"| {batch} | {np.mean(lens):.0f} | {t * 1e3:.1f} | {batch / t:.1f} | {roofline * 1e3:.1f} | "
                  f"{t / roofline:.2f}x |")


if __name__ == "__main__":
    main()
