"""Unrolled layers vs `lax.scan` over stacked layer weights: start-up cost against step cost.

Tracing one layer in a scan would make a step function ~30x smaller to trace, compile and deserialise, but scan
needs the weights stacked [L, ...] and XLA CPU slices a layer out of them every step. This measures both sides on
SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536, 9 query / 3 KV heads of 64; weights in the given dtype,
f32 activations, the engine's dot form): the layers' matmuls, norms and residuals without attention, so the step
figures are a lower bound on what scan would cost the real model. Medians over runs, one process.

    python benchmarks/layer_scan.py --rows 2,64 --runs 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxinfer.layers import dot_in_weight_dtype, rms_norm  # noqa: E402

SHAPES = {"wq": (576, 576), "wk": (576, 192), "wv": (576, 192), "wo": (576, 576), "w_gate": (576, 1536),
          "w_up": (576, 1536), "w_down": (1536, 576)}
LAYERS = 30


def layer(x, w):
    h = rms_norm(x, w["attn_norm"], 1e-5)
    q, k, v = (dot_in_weight_dtype(h, w[n]) for n in ("wq", "wk", "wv"))
    x = x + dot_in_weight_dtype(q + jnp.tile(k + v, (1, 3)), w["wo"])  # stands in for attention
    h = rms_norm(x, w["mlp_norm"], 1e-5)
    return x + dot_in_weight_dtype(jax.nn.silu(dot_in_weight_dtype(h, w["w_gate"])) * dot_in_weight_dtype(
        h, w["w_up"]), w["w_down"])


def unrolled(x, layers):
    for w in layers:
        x = layer(x, w)
    return x


def scanned(x, stacked):
    return jax.lax.scan(lambda x, w: (layer(x, w), None), x, stacked)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2,64")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(a.dtype)
    layers = [{**{n: jnp.asarray(rng.standard_normal(s) * 0.02, dtype) for n, s in SHAPES.items()},
               "attn_norm": jnp.ones(576), "mlp_norm": jnp.ones(576)} for _ in range(LAYERS)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    print(f"load average {os.getloadavg()[0]:.2f}; weights {a.dtype}; medians of {a.runs} runs\n")
    print("| variant | rows | trace+lower s | compile s | deserialise s | step ms |\n|---|---|---|---|---|---|")
    for rows in (int(r) for r in a.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
        for name, fn, weights in (("unrolled", unrolled, layers), ("scan", scanned, stacked)):
            t0 = time.perf_counter()
            lowered = jax.jit(fn).trace(x, weights).lower()
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            blob = serialize(compiled)
            t3 = time.perf_counter()
            deserialize_and_load(*blob)
            t4 = time.perf_counter()
            compiled(x, weights).block_until_ready()
            steps = []
            for _ in range(a.runs):
                s = time.perf_counter()
                compiled(x, weights).block_until_ready()
                steps.append(time.perf_counter() - s)
            print(f"| {name} | {rows} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t4 - t3:.2f} | "
                  f"{statistics.median(steps) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
