"""Per-machine CPU defaults, chosen by measuring this machine: the layer-weight dtype.

XLA CPU's bf16 x bf16 -> f32 dot runs at 1.4-2x the f32 rate on CPUs with AVX-512 (and avx512_bf16), but on
AVX2-only CPUs it is no faster at batch and up to 1.4x slower at the one or two rows of single-stream decode
(BUILD.md has both machines' figures). No fixed default is right for both, so when `weight_dtype` is not given
the engine times the decode step's dots in both forms at the model's own shapes, once per machine, caches the
answer under ~/.cache/jaxinfer (JAXINFER_CACHE_DIR overrides), and logs what it chose and why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time

# Rows timed: single-stream decode (the engine's smallest bucket) and a mid-size decode batch.
PROBE_ROWS = (2, 32)
# The probe's weights total about this many f32 bytes, more than a CPU's caches, so that it reads weights from
# memory as a decode step does (at one or two rows a step is bound by weight bytes, which bf16 halves).
PROBE_BYTES = 128 * 2**20
# bf16 must win by this margin at every probed row count: a tie goes to f32, which is exact.
BF16_MARGIN = 0.95
# Above this share of available memory, f32 weights are not an option whatever the speed.
MEMORY_SHARE = 0.4
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "bf16", "sve")


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    dtype: str                      # "float32" | "bfloat16"
    reason: str                     # one line for the log
    seconds: dict | None = None     # {"float32": {rows: s}, "bfloat16": {rows: s}} when measured
    cached: bool = False


def cpu_signature() -> dict:
    """What the choice depends on: the CPU model and its vector extensions, the core count and the JAX version."""
    import jax

    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return {"cpu": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": sorted(flags.intersection(_CPU_FLAGS)), "jax": jax.__version__}


def decide(seconds: dict, f32_weight_bytes: int, available_bytes: int | None) -> DtypeChoice:
    """The rule, given measured seconds per probe call for each dtype and row count (pure; unit-tested)."""
    if available_bytes is not None and f32_weight_bytes > MEMORY_SHARE * available_bytes:
        return DtypeChoice("bfloat16", f"float32 weights ({f32_weight_bytes / 2**30:.1f} GiB) would take more than "
                                       f"{MEMORY_SHARE:.0%} of available memory", seconds)
    ratios = {rows: seconds["bfloat16"][rows] / seconds["float32"][rows] for rows in seconds["float32"]}
    shown = ", ".join(f"{r} rows {ratio:.2f}x" for r, ratio in sorted(ratios.items()))
    if all(ratio <= BF16_MARGIN for ratio in ratios.values()):
        return DtypeChoice("bfloat16", f"bf16-weight dots take {shown} the f32 time on this CPU", seconds)
    return DtypeChoice("float32", f"bf16-weight dots are not faster on this CPU ({shown} the f32 time)", seconds)


def measure_weight_dtypes(shapes: dict, num_layers: int, rows=PROBE_ROWS, runs: int = 5) -> dict:
    """Median seconds of a chain of decoder-layer matmuls (`shapes`: name -> [in, out] of one layer's linear
    weights, as `layer_matmul_shapes` gives) over enough layers to read about PROBE_BYTES of f32 weights, in the
    engine's form: the activation cast to the weight dtype, f32 accumulation."""
    import jax
    import jax.numpy as jnp

    layer_bytes = 4 * sum(i * o for i, o in shapes.values())
    count = int(min(num_layers, max(1, PROBE_BYTES // layer_bytes)))

    def dot(x, w):
        return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)

    @jax.jit
    def probe(x, layers):
        for w in layers:  # the dots of a Llama layer, in order, without attention and norms
            q = dot(x, w["wq"])
            x = x + dot(q, w["wo"]) + dot(x, w["wk"]).sum(-1, keepdims=True) + dot(x, w["wv"]).mean(-1, keepdims=True)
            x = x + dot(jax.nn.silu(dot(x, w["w_gate"])) * dot(x, w["w_up"]), w["w_down"])
        return x

    out: dict = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        layers = [{k: jnp.full(shape, 1e-3 * (i + 1), dtype) for k, shape in shapes.items()} for i in range(count)]
        out[name] = {}
        for m in rows:
            x = jnp.ones((m, shapes["wq"][0]), jnp.float32)
            probe(x, layers).block_until_ready()  # compile
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                probe(x, layers).block_until_ready()
                times.append(time.perf_counter() - start)
            out[name][m] = statistics.median(times)
        del layers
    return out


def layer_matmul_shapes(config) -> dict:
    """[in, out] of each linear weight of one decoder layer."""
    d, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w_gate": (d, i), "w_up": (d, i),
            "w_down": (i, d)}


def choose_weight_dtype(config, cache_dir: str | None = None, measure=measure_weight_dtypes) -> DtypeChoice:
    """bfloat16 or float32 layer weights for a model of these shapes on this CPU: from the cache when this machine
    has answered before, otherwise measured now (about two seconds) and cached."""
    shapes = layer_matmul_shapes(config)
    signature = {**cpu_signature(), "shapes": sorted(shapes.items()), "num_layers": config.num_layers}
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), "cpu_weight_dtype.json")
    entries = _read_json(path)
    cached = key in entries
    if cached:
        seconds = {d: {int(r): s for r, s in v.items()} for d, v in entries[key]["seconds"].items()}
    else:
        seconds = measure(shapes, config.num_layers)
        entries[key] = {"signature": signature, "seconds": seconds}
        _write_json(path, entries)
    return dataclasses.replace(decide(seconds, 4 * config.num_params, _available_memory()), cached=cached)


def default_cache_dir() -> str:
    return os.environ.get("JAXINFER_CACHE_DIR") or os.path.expanduser("~/.cache/jaxinfer")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, entries: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
