"""Cost of one jitted decode step of SmolLM2-135M (random weights in the engine's default dtypes, XLA attention
path) by batch size and context, against the matmul roofline measured in the same run (the step's matmul FLOPs at
the machine's measured dot rate for that weight dtype). Shows how much of a step the paged attention costs.

    python benchmarks/decode_step.py [--batches 8,32,64] [--contexts 8,150]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--contexts", default="8,150", help="mean context; contexts spread from 16 to 2*mean-16")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="stored layer weights (the engine's default is bfloat16; activations and KV stay float32)")
    p.add_argument("--head-dtype", default="float32", choices=("bfloat16", "float32"),
                   help="embedding / LM head (the engine keeps them at the activation dtype, float32 on CPU)")
    a = p.parse_args()
    weight_dtype = jnp.dtype(a.weight_dtype)
    config = load_preset("smollm2-135m")
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
