"""What this CPU offers for quantized decode: every formulation of `jaxinfer.quantization.xla_matmul` (the XLA
ones, and the native kernel `cpu_kernel` where it is built) for each packing the engine loads, against the f32
and bf16 dots, at SmolLM2-135M's matmul shapes and M = 1..64 rows.

Each cell is the median time of one matrix call, measured as a jitted chain over enough distinct copies of the
weight (passed as arguments, never as constants) that the chain reads its weights from memory as a decode step
does, with a data dependency between calls. The machine's memory bandwidth is measured first.

    python benchmarks/quant_matmul_cpu.py [--rows 1,2,4,8,16,32,64] [--shapes 576x576,...] [--runs 7]
        [--compiler-option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an uninstalled jaxinfer

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer.cpu_probe import cpu_signature  # noqa: E402
from jaxinfer.quantization import QuantLayout, quantize  # noqa: E402
from jaxinfer.quantization.xla_matmul import (FORMULATIONS, applicable, cpu_compiler_options,  # noqa: E402
                                              xla_quant_matmul)

# SmolLM2-135M: q/o projections, k/v projections, gate/up, down, and the (tied) LM head
SHAPES = ("576x576", "576x192", "576x1536", "1536x576", "576x49152")
CHAIN_F32_BYTES = 128 * 2**20  # each chain holds about this many f32 bytes of weights (4x the L3 cache here)
MAX_CHAIN = 96


def packings(k: int) -> dict:
    """The packings the engine runs: name -> quantize() arguments (scales as their sources store them)."""
    g4 = 128 if k % 128 == 0 else 64
    return {"int8 per-channel": dict(bits=8, group_size=None, symmetric=True, scale_dtype=jnp.float32),
            "GGUF Q8_0 (int8 g32)": dict(bits=8, group_size=32, symmetric=True, scale_dtype=jnp.float16),
            "GGUF Q4_1 (int4 g32 + min)": dict(bits=4, group_size=32, symmetric=False, scale_dtype=jnp.float16,
                                               offsets_f16=True),
            f"int4 g{g4} (RTN / GPTQ sym)": dict(bits=4, group_size=g4, symmetric=True, scale_dtype=jnp.float16)}


def memory_bandwidth() -> dict:
    """GB/s of a 512 MiB copy with numpy (one thread) and of reading 512 MiB in a jitted reduction."""
    a = np.ones(2**27, np.float32)
    b = np.empty_like(a)
    t = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        t.append(time.perf_counter() - start)
    x = jnp.ones(2**27, jnp.float32)
    f = jax.jit(lambda v: jnp.max(v))
    f(x).block_until_ready()
    r = []
    for _ in range(5):
        start = time.perf_counter()
        f(x).block_until_ready()
        r.append(time.perf_counter() - start)
    return {"numpy copy (read + write)": 2 * a.nbytes / statistics.median(t) / 1e9,
            "XLA read (max-reduce)": x.nbytes / statistics.median(r) / 1e9}


def make_weights(kind: str, spec: dict | None, k: int, n: int, copies: int, rng):
    base = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    if spec is None:
        dtype = jnp.float32 if kind == "f32" else jnp.bfloat16
        return [jnp.array(base, dtype) for _ in range(copies)]
    spec = dict(spec)
    f16_offsets = spec.pop("offsets_f16", False)
    w = quantize(base, **spec)
    if f16_offsets:
        w = type(w)(w.qweight, w.scales, np.asarray(w.offsets, np.float16), None, w.bits, w.group_size)
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), w) for _ in range(copies)]


def chain(op, compiler_options, x, weights):
    def run(x, weights):
        acc = None
        for w in weights:  # a data dependency between calls, as between layers
            y = op(x if acc is None else x + 1e-6 * acc[:, :1], w).astype(jnp.float32)
            acc = y if acc is None else acc + y
        return acc

    return jax.jit(run).lower(x, weights).compile(compiler_options or None)


def float_op(x, w):
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--compiler-option", action="append", default=[],
                   help="KEY=VALUE XLA option for every chain; default: as the engine compiles, float dots with "
                        "plain XLA options and packed ones with cpu_compiler_options() (YNNPACK dot fusion)")
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    options = dict(o.split("=", 1) for o in a.compiler_option)
    packed_options = options or dict(cpu_compiler_options())
    sig = cpu_signature()
    print(f"machine: {sig['cpu']}, {sig['cores']} cores, flags {' '.join(sig['flags'])}; jax {sig['jax']}; "
          f"load average {os.getloadavg()[0]:.1f} at start; compiler options: float {options or 'default'}, "
          f"packed {packed_options or 'default'}")
    bw = memory_bandwidth()
    print("memory bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    rng = np.random.default_rng(0)
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        copies = int(max(1, min(MAX_CHAIN, CHAIN_F32_BYTES // (4 * k * n))))
        entries = []  # (weight kind, formulation, weight bytes per matrix, compiled per M)
        for kind, spec in [("f32", None), ("bf16", None)] + list(packings(k).items()):
            weights = make_weights(kind, spec, k, n, copies, rng)
            nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(weights[0]))
            forms = ["dot"] if spec is None else [
                f for f in FORMULATIONS if applicable(f, QuantLayout.of(weights[0]), k)]
            for form in forms:
                op = float_op if spec is None else (lambda x, w, form=form: xla_quant_matmul(x, w, form))
                xs = {m: jnp.asarray(rng.standard_normal((m, k)), jnp.float32) for m in rows}
                compiled = {m: chain(op, options if spec is None else packed_options, xs[m], weights) for m in rows}
                entries.append((kind, form, nbytes, compiled, xs, weights))
        times = {(i, m): [] for i in range(len(entries)) for m in rows}
        for i, (_, _, _, compiled, xs, weights) in enumerate(entries):
            for m in rows:
                compiled[m](xs[m], weights).block_until_ready()
        for _ in range(a.runs):  # interleaved, so load changes hit every entry alike
            for i, (_, _, _, compiled, xs, weights) in enumerate(entries):
                for m in rows:
                    start = time.perf_counter()
                    compiled[m](xs[m], weights).block_until_ready()
                    times[(i, m)].append((time.perf_counter() - start) / copies)
        med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        f32 = next(i for i, e in enumerate(entries) if e[0] == "f32")
        print(f"\n### {k}x{n} (x [M, {k}] @ W [{k}, {n}]), chain of {copies}, median ms per matrix "
              f"(x f32 time); fastest of each packing in bold")
        print("| weights | bytes | formulation | " + " | ".join(f"M={m}" for m in rows) + " |")
        print("|---|---|---|" + "---|" * len(rows))
        for i, (kind, form, nbytes, *_) in enumerate(entries):
            same = [j for j, e in enumerate(entries) if e[0] == kind]
            cells = []
            for m in rows:
                cell = f"{med[(i, m)]:.3f} ({med[(i, m)] / med[(f32, m)]:.2f}x)"
                best = min(same, key=lambda j: med[(j, m)])
                cells.append(f"**{cell}**" if len(same) > 1 and best == i else cell)
            print(f"| {kind} | {nbytes / 2**20:.2f} MiB | {form} | " + " | ".join(cells) + " |", flush=True)
        del entries
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
