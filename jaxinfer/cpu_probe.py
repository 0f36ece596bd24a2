"""Per-machine CPU defaults, chosen by measuring this machine: the layer-weight dtype, and for packed
(quantized) weights which XLA formulation runs each matmul and whether packed beats float at all.

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
import math
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


def cpu_info() -> tuple[str, set]:
    """(CPU model name, its feature flags) from /proc/cpuinfo (model from `platform` and no flags elsewhere)."""
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
    return model, flags


def cpu_signature() -> dict:
    """What the choice depends on: the CPU model and its vector extensions, the core count and the JAX version."""
    import jax

    model, flags = cpu_info()
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


def _median_seconds(probe, x, layers, runs: int) -> float:
    """Median wall time of `probe(x, layers)` over `runs` calls after one untimed (compiling) call."""
    probe(x, layers).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        probe(x, layers).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
            out[name][m] = _median_seconds(probe, jnp.ones((m, shapes["wq"][0]), jnp.float32), layers, runs)
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


# ------------------------------------------------------------------------------- packed (quantized) weights
# A packed checkpoint is run packed by default when it keeps up with float weights (`keeps_up`: at most this
# much slower in the geometric mean over the probed row counts; it also holds 2-8x less memory). Otherwise its
# layer weights are re-quantized to int8 per channel when *that* passes the same test (their error is a small
# fraction of the checkpoint's own), and only then expanded to float.
PACKED_MARGIN = 1.05
INT8_LAYOUT = ("int8", 8, "float32")  # what `transcode` produces: tag, bits, scale dtype (one group, symmetric)


def keeps_up(ratios: dict) -> bool:
    """Whether packed weights keep up with float ones, given {rows: packed time / float time}: the geometric mean
    over the probed row counts is at most PACKED_MARGIN. A packing 2.5x faster at 2 rows and 7% slower at 32 keeps
    up (it also holds several times less memory); one 3x slower at 2 rows does not, whatever it does at 32."""
    return math.prod(ratios.values()) ** (1 / len(ratios)) <= PACKED_MARGIN


@dataclasses.dataclass(frozen=True)
class QuantChoice:
    action: str                     # "packed" (as loaded) | "int8" (re-quantize layer weights) | "float"
    plan: "object"                  # QuantMatmulPlan (jaxinfer.quantization.xla_matmul) for the weights as loaded
    reason: str
    seconds: dict | None = None     # {"float": {rows: s}, "packed:<formulation>": ..., "int8:<formulation>": ...}
    cached: bool = False


def _plan(seconds: dict, prefix: str, grouped: bool, w8a8: bool = False):
    """The fastest formulation of one candidate per probed row count, as a QuantMatmulPlan, and its seconds.
    Formulations that quantize the activations (W8A8) compete only with `w8a8`."""
    from jaxinfer.quantization.xla_matmul import ACTIVATION_QUANTIZING, QuantMatmulPlan

    forms = [k for k in seconds if k.startswith(prefix + ":")
             and (w8a8 or k.split(":", 1)[1] not in ACTIVATION_QUANTIZING)]
    rows = sorted(seconds["float"])
    best = {r: min(forms, key=lambda f: seconds[f][r]) for r in rows}
    # a probed row count's winner serves every row count up to the geometric middle to the next probed one
    bounds = [int((a * b) ** 0.5) for a, b in zip(rows, rows[1:])] + [2**31]
    table = tuple((bound, best[r].split(":", 1)[1]) for bound, r in zip(bounds, rows))
    plan = QuantMatmulPlan(grouped=table) if grouped else QuantMatmulPlan(per_channel=table)
    return plan, {r: seconds[best[r]][r] for r in rows}, best


def decide_quant(seconds: dict, grouped: bool, float_bytes: int, available_bytes: int | None,
                 w8a8: bool = False) -> QuantChoice:
    """What to do with a packed model's layer weights, from measured seconds per probe call (pure; unit-tested).
    `grouped`: the loaded packing has several groups per column (int8 re-quantization is then a candidate).
    `w8a8`: formulations that quantize activations to int8 may be chosen (they change the model's outputs:
    docs/QUANTIZATION.md)."""
    rows = sorted(seconds["float"])
    plan, packed, best = _plan(seconds, "packed", grouped, w8a8)
    show = lambda t, b: ", ".join(f"{r} rows {b[r].split(':', 1)[1]} {t[r] / seconds['float'][r]:.2f}x" for r in rows)
    if available_bytes is not None and float_bytes > MEMORY_SHARE * available_bytes:
        return QuantChoice("packed", plan, f"float weights ({float_bytes / 2**30:.1f} GiB) would take more than "
                                           f"{MEMORY_SHARE:.0%} of available memory", seconds)
    fits = lambda t: keeps_up({r: t[r] / seconds["float"][r] for r in rows})
    if fits(packed):
        return QuantChoice("packed", plan, f"packed matmuls take {show(packed, best)} the float time", seconds)
    why = f"packed matmuls are slower than float ones here ({show(packed, best)} the float time)"
    if any(k.startswith("int8:") for k in seconds):
        _, int8, int8_best = _plan(seconds, "int8", False, w8a8)
        if fits(int8):
            return QuantChoice("int8", plan, f"{why}; re-quantized to int8 per channel they take "
                                             f"{show(int8, int8_best)}", seconds)
    return QuantChoice("float", plan, why, seconds)


def measure_quant_matmul(shapes: dict, layouts: dict, float_dtype: str, num_layers: int, rows=PROBE_ROWS,
                         runs: int = 5, transcode: bool = True) -> dict:
    """Median seconds of the decoder-layer matmul chain of `measure_weight_dtypes`: once with float weights
    (`float_dtype`, plain XLA options), once per applicable XLA formulation with packed weights of the model's
    own packing (`layouts`: name -> QuantLayout), and with `transcode` once per formulation of int8 per-channel
    weights; packed chains compile with `cpu_compiler_options()`, as the engine does."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.quantization.weight import QuantLayout
    from jaxinfer.quantization.xla_matmul import FORMULATIONS, applicable, cpu_compiler_options, xla_quant_matmul

    layer_bytes = 4 * sum(i * o for i, o in shapes.values())
    count = int(min(num_layers, max(1, PROBE_BYTES // layer_bytes)))

    def packed_weight(layout, shape, i):
        w = layout.zeros(shape)
        fill = lambda a: None if a is None else jnp.full(a.shape, 1e-3 * (i + 1), a.dtype)
        return dataclasses.replace(w, scales=fill(w.scales), offsets=fill(w.offsets))

    def chain(dot, options):
        def probe(x, layers):
            for w in layers:
                q = dot(x, w["wq"])
                x = (x + dot(q, w["wo"]) + dot(x, w["wk"]).sum(-1, keepdims=True)
                     + dot(x, w["wv"]).mean(-1, keepdims=True))
                x = x + dot(jax.nn.silu(dot(x, w["w_gate"])) * dot(x, w["w_up"]), w["w_down"])
            return x
        return jax.jit(probe, compiler_options=dict(options) or None)

    def time_chain(probe, layers):
        out = {}
        for m in rows:
            out[m] = _median_seconds(probe, jnp.ones((m, shapes["wq"][0]), jnp.float32), layers, runs)
        return out

    dtype = jnp.dtype(float_dtype)
    layers = [{k: jnp.full(shape, 1e-3 * (i + 1), dtype) for k, shape in shapes.items()} for i in range(count)]
    float_dot = lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    result = {"float": time_chain(chain(float_dot, ()), layers)}
    int8 = {k: QuantLayout(8, shapes[k][0], INT8_LAYOUT[2], None, False) for k in shapes}
    for tag, lay in (("packed", layouts), ("int8", int8)):
        if tag == "int8" and not transcode:
            continue
        layers = [{k: packed_weight(lay[k], shapes[k], i) for k in shapes} for i in range(count)]
        for f in FORMULATIONS:
            if all(applicable(f, lay[k], shapes[k][0]) for k in shapes):
                op = lambda x, w, f=f: xla_quant_matmul(x, w, f)
                result[f"{tag}:{f}"] = time_chain(chain(op, cpu_compiler_options()), layers)
    return result


def choose_quant_matmul(config, packing, float_dtype: str, cache_dir: str | None = None,
                        measure=measure_quant_matmul, w8a8: bool = False) -> QuantChoice:
    """How a packed model's layer weights run on this CPU (`packing`: (spec key, QuantLayout) pairs, as
    `packing_of(params)` gives): packed as loaded, re-quantized to int8 per channel, or expanded to float
    (`float_dtype`), and the XLA formulation per row count. Probed at the model's layer shapes with its own
    packing (that of layers_0's weights), once per machine and cached like the weight dtype."""
    from jaxinfer.quantization.xla_matmul import QuantMatmulPlan

    shapes = layer_matmul_shapes(config)
    layouts = {key.split("/")[-1]: layout for key, layout in packing if key.startswith("layers_0/")}
    if set(layouts) != set(shapes):  # not every layer weight packed: nothing comparable to probe
        return QuantChoice("packed", QuantMatmulPlan(), "only some layer weights are packed: kept as loaded")
    grouped = any(layouts[k].group_size < shapes[k][0] for k in shapes)
    transcode = grouped or any(v.bits != 8 for v in layouts.values())
    signature = {**cpu_signature(), "shapes": sorted(shapes.items()), "num_layers": config.num_layers,
                 "layouts": sorted((k, dataclasses.astuple(v)) for k, v in layouts.items()), "float": float_dtype,
                 "transcode": transcode, "cpu_kernel": _kernel_identity()}
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), "cpu_quant_matmul.json")
    entries = _read_json(path)
    cached = key in entries
    if cached:
        seconds = {f: {int(r): t for r, t in v.items()} for f, v in entries[key]["seconds"].items()}
    else:
        seconds = measure(shapes, layouts, float_dtype, config.num_layers, transcode=transcode)
        entries[key] = {"signature": signature, "seconds": seconds}
        _write_json(path, entries)
    float_bytes = jnp_itemsize(float_dtype) * config.num_params
    return dataclasses.replace(decide_quant(seconds, grouped, float_bytes, _available_memory(), w8a8),
                               cached=cached)


def _kernel_identity():
    from jaxinfer.native import quant_matmul_cpu

    return quant_matmul_cpu.identity()


def measure_head(hidden: int, vocab: int, layout, float_dtype: str, rows=PROBE_ROWS, runs: int = 5) -> dict:
    """Median seconds of `[rows, hidden] @ head` with the head in `float_dtype` and packed (`layout`) through the
    native kernel; one matrix of this size is far larger than the caches, so it reads from memory."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.native import quant_matmul_cpu

    one = lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    head = jnp.full((hidden, vocab), 1e-3, float_dtype)
    out = {"float": {m: _median_seconds(jax.jit(one), jnp.ones((m, hidden)), head, runs) for m in rows}}
    del head
    packed = layout.zeros((hidden, vocab))
    packed = dataclasses.replace(packed, scales=jnp.full(packed.scales.shape, 1e-3, packed.scales.dtype))
    kernel = jax.jit(quant_matmul_cpu.quant_matmul)
    out["cpu_kernel"] = {m: _median_seconds(kernel, jnp.ones((m, hidden)), packed, runs) for m in rows}
    return out


def keep_head_packed(config, layout, float_dtype: str, cache_dir: str | None = None,
                     measure=measure_head) -> tuple[bool, str]:
    """Whether a packed LM head (embedding, when tied) runs about as fast through the native kernel as expanded
    to `float_dtype` on this CPU (`keeps_up` over the probed row counts; measured once per machine, cached)."""
    from jaxinfer.native import quant_matmul_cpu

    if not (quant_matmul_cpu.available()
            and quant_matmul_cpu.supports(layout.bits, layout.group_size, config.vocab_size)):
        return False, f"the native kernel does not run it here ({quant_matmul_cpu.status()[1]})"
    signature = {**cpu_signature(), "hidden": config.hidden_size, "vocab": config.vocab_size,
                 "layout": dataclasses.astuple(layout), "float": float_dtype, "cpu_kernel": _kernel_identity()}
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), "cpu_head_matmul.json")
    entries = _read_json(path)
    if key in entries:
        seconds = {f: {int(r): t for r, t in v.items()} for f, v in entries[key]["seconds"].items()}
    else:
        seconds = measure(config.hidden_size, config.vocab_size, layout, float_dtype)
        entries[key] = {"signature": signature, "seconds": seconds}
        _write_json(path, entries)
    ratios = {r: seconds["cpu_kernel"][r] / seconds["float"][r] for r in sorted(seconds["float"])}
    shown = ", ".join(f"{r} rows {x:.2f}x" for r, x in ratios.items())
    return keeps_up(ratios), f"the native kernel takes {shown} the float time"


def jnp_itemsize(dtype: str) -> int:
    import jax.numpy as jnp

    return jnp.dtype(dtype).itemsize


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
