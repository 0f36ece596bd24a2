"""Cost of one jitted decode step of SmolLM2-135M (random weights, fp32, XLA attention path) by batch size and
context, against the matmul roofline measured in the same run (the step's matmul FLOPs at the machine's measured
fp32 dot rate). Shows how much of a step the paged attention costs on this machine.

    python benchmarks/decode_step.py [--batches 8,32,64] [--contexts 8,150]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAXINFER_QUIET", "1")

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


def dot_rate(m: int) -> float:
    x, w = jnp.ones((m, 576)), jnp.ones((576, 49152))
    f = jax.jit(jnp.dot)
    f(x, w).block_until_ready()
    return 2 * m * 576 * 49152 / timed(lambda: f(x, w), 10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--contexts", default="8,150", help="mean context; contexts spread from 16 to 2*mean-16")
    p.add_argument("--runs", type=int, default=7)
    a = p.parse_args()
    config = load_preset("smollm2-135m")
    params = random_params(config, jnp.float32)
    model = LlamaModel(config)
    step = jax.jit(lambda p, kv, b: model.apply({"params": p}, kv, b), donate_argnums=1)
    block = 16
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; model smollm2-135m fp32, random weights")
    print("| sequences | mean context | ms/step (median) | tok/s | matmul roofline ms | step / roofline |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in a.batches.split(",")]:
        rate = dot_rate(batch)
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
