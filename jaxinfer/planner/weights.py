"""Weight bytes, counted from the parameter declarations (jaxinfer.params), whole and per device.

Each declared parameter is stored as one array (plain weights, norms, biases) or, when quantized, as the leaves
of a `QuantizedWeight` built by `QuantLayout.zeros` (packed codes, scales, optional f32 offsets, optional act-order
permutation): the planner asks JAX for those leaves' shapes (`jax.eval_shape`), so it counts exactly what
`jaxinfer.quantization` stores. Only LINEAR parameters are quantized (as GPTQ/AWQ checkpoints do); the embedding
and LM head stay at the head dtype, norms and biases at the float dtype.

Per device: `shard_count` is the one place that says how the tensor axis splits a logical axis, and
`stage_specs` which parameters each pipeline stage holds.
TODO(scale-out merge): switch `shard_count` to read `jaxinfer.sharding`'s rules table so the two cannot drift.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.params import (KV_HEADS, MLP, Q_HEADS, VOCAB, Kind, ParamSpec, global_specs, layer_specs,
                             model_specs)
from jaxinfer.quantization.weight import QuantLayout

# Logical axes the Megatron layout splits over the tensor axis (q/k/v, gate/up column-parallel; o, down
# row-parallel; embedding and LM head vocab-parallel). `embed` (the residual stream) is never split: norms and
# the hidden side of every matrix are whole on each device.
TENSOR_PARALLEL_AXES = (Q_HEADS, KV_HEADS, MLP, VOCAB)

FLOAT_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BITS = {"int8": 8, "int4": 4}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int8": "int8",
                 "int4": "int4", "fp8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}


def canonical_dtype(name: str) -> str:
    try:
        return DTYPE_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(set(DTYPE_ALIASES))}") from None


def dtype_bytes(name: str) -> int:
    return jnp.dtype(canonical_dtype(name)).itemsize


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How the weights are stored: `dtype` float32/bfloat16/float16, or int8/int4 weight-only quantization of
    the linear layers with `group_size` rows per scale (-1: one group per column), f32 offsets unless
    `symmetric`, a stored permutation with `act_order`. `head_dtype`: embedding and LM head; `float_dtype`:
    norms and biases (and everything when not quantized)."""
    dtype: str = "bfloat16"
    head_dtype: str = "bfloat16"
    float_dtype: str = "bfloat16"
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "float16"
    act_order: bool = False

    def __post_init__(self):
        for field in ("dtype", "head_dtype", "float_dtype", "scale_dtype"):
            object.__setattr__(self, field, canonical_dtype(getattr(self, field)))
        if self.dtype not in FLOAT_DTYPES and self.dtype not in QUANT_BITS:
            raise ValueError(f"weight dtype {self.dtype} is neither a float dtype nor int8/int4")

    @property
    def layout(self) -> QuantLayout | None:
        if self.dtype not in QUANT_BITS:
            return None
        return QuantLayout(QUANT_BITS[self.dtype], self.group_size, self.scale_dtype, not self.symmetric,
                           self.act_order)

    def describe(self) -> str:
        if self.layout is None:
            return self.dtype
        group = "per-channel" if self.group_size in (-1, None) else f"group {self.group_size}"
        return (f"{self.dtype} ({group}, {self.scale_dtype} scales{'' if self.symmetric else ', f32 offsets'}"
                f"{', act-order perm' if self.act_order else ''})")


@functools.lru_cache(maxsize=None)
def _packed_leaves(layout: QuantLayout, shape: tuple[int, int]) -> tuple[tuple[tuple[int, ...], int], ...]:
    """(shape, itemsize) of each array a packed [K, N] weight is stored as."""
    k = shape[0]
    gs = k if layout.group_size in (-1, None) else layout.group_size
    if k % gs or (layout.bits == 4 and k % 8):
        raise ValueError(f"cannot pack a [{k}, {shape[1]}] weight as int{layout.bits} with group size {gs}: "
                         f"the input dim must divide by the group size{' and by 8' if layout.bits == 4 else ''}")
    layout = dataclasses.replace(layout, group_size=gs)
    abstract = jax.eval_shape(lambda: layout.zeros(shape))
    return tuple((tuple(x.shape), jnp.dtype(x.dtype).itemsize) for x in jax.tree_util.tree_leaves(abstract))


def stored_arrays(spec: ParamSpec, fmt: WeightFormat) -> list[tuple[tuple[int, ...], tuple[str, ...], int]]:
    """The arrays one parameter is stored as: (shape, logical axes of each dim, itemsize)."""
    if spec.kind == Kind.HEAD:
        return [(spec.shape, spec.axes, dtype_bytes(fmt.head_dtype))]
    if spec.kind == Kind.LINEAR and fmt.layout is not None:
        # qweight / scales / offsets are [rows, N] with rows along the input axis; perm is [K].
        return [(shape, spec.axes[:len(shape)], size) for shape, size in _packed_leaves(fmt.layout, spec.shape)]
    dtype = fmt.dtype if spec.kind == Kind.LINEAR else fmt.float_dtype
    return [(spec.shape, spec.axes, dtype_bytes(dtype))]


# ---------------------------------------------------------------------------------------- tensor parallel

def shard_count(axis: str, config: ModelConfig, tp: int) -> int:
    """Into how many pieces the tensor axis (size tp) splits a dimension of logical axis `axis`: tp, or 1 when
    it is replicated. KV heads (and the vocabulary) that do not divide by tp are replicated on every device;
    query heads and the MLP must divide, or the model cannot run at this TP degree."""
    if tp == 1 or axis not in TENSOR_PARALLEL_AXES:
        return 1
    if axis == KV_HEADS:
        return tp if config.num_kv_heads % tp == 0 else 1
    if axis == VOCAB:
        return tp if config.vocab_size % tp == 0 else 1
    count = config.num_heads if axis == Q_HEADS else config.intermediate_size
    if count % tp:
        what = "query heads" if axis == Q_HEADS else "MLP intermediate size"
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {what} ({count})")
    return tp


def device_shape(shape: tuple[int, ...], axes: tuple[str, ...], config: ModelConfig, tp: int) -> tuple[int, ...]:
    """The shape one device of the tensor axis holds of an array with these logical axes."""
    out = []
    for dim, axis in zip(shape, axes):
        n = shard_count(axis, config, tp)
        if dim % n:
            raise ValueError(f"a dimension of size {dim} on axis {axis!r} does not split {n} ways (a quantized "
                             "weight's groups or packed rows must divide the shard)")
        out.append(dim // n)
    return tuple(out)


def kv_heads_per_device(config: ModelConfig, tp: int) -> int:
    return config.num_kv_heads // shard_count(KV_HEADS, config, tp)


def q_heads_per_device(config: ModelConfig, tp: int) -> int:
    return config.num_heads // shard_count(Q_HEADS, config, tp)


# -------------------------------------------------------------------------------------- pipeline parallel

def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (earlier stages take the extra)."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} must be between 1 and the number of layers ({num_layers})")
    base, extra = divmod(num_layers, pp)
    starts = [s * base + min(s, extra) for s in range(pp + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(pp)]


def stage_specs(config: ModelConfig, pp: int) -> list[list[ParamSpec]]:
    """The parameters each stage holds: its layers; the embedding on the first stage; final norm and LM head on
    the last. A tied model's one matrix serves the lookup (first stage) and the LM head (last), so with pp > 1
    both stages hold a copy."""
    glob = {s.name: s for s in global_specs(config)}
    stages = []
    for s, layers in enumerate(stage_layers(config.num_layers, pp)):
        specs = []
        if s == 0:
            specs.append(glob["lm_head"] if config.tie_word_embeddings else glob["embed"])
        specs += [p for i in layers for p in layer_specs(config, i)]
        if s == pp - 1:
            specs.append(glob["final_norm"])
            if not (config.tie_word_embeddings and s == 0):
                specs.append(glob["lm_head"])
        stages.append(specs)
    return stages


# ------------------------------------------------------------------------------------------------ report

def spec_bytes(spec: ParamSpec, fmt: WeightFormat, config: ModelConfig, tp: int = 1) -> int:
    """Bytes of one parameter on one device of the tensor axis (tp=1: the whole parameter)."""
    return sum(math.prod(device_shape(shape, axes, config, tp)) * size
               for shape, axes, size in stored_arrays(spec, fmt))


def is_gathered_only(spec: ParamSpec, stage: int, config: ModelConfig, pp: int) -> bool:
    """A table a step only gathers rows of (the embedding; a tied matrix's lookup copy on the first of several
    stages), so decode does not stream it from memory."""
    return spec.name == "embed" or (config.tie_word_embeddings and pp > 1 and stage == 0
                                    and spec.name == "lm_head")


@dataclasses.dataclass(frozen=True)
class StageWeights:
    layers: range
    bytes: int             # on one device of this stage
    streamed_bytes: int    # what a step's matmuls read (all but gathered-only tables)
    replicated_bytes: int  # of `bytes`, tensors the tensor axis does not split (norms, replicated KV heads, ...)


@dataclasses.dataclass(frozen=True)
class WeightReport:
    num_params: int        # logical parameters (elements of the declared shapes)
    total_bytes: int       # one copy of the whole model as stored
    stages: tuple[StageWeights, ...]
    by_kind: dict          # kind -> bytes on the largest stage's device


def weight_report(config: ModelConfig, fmt: WeightFormat, tp: int = 1, pp: int = 1) -> WeightReport:
    specs = model_specs(config)
    total = sum(spec_bytes(s, fmt, config) for s in specs)
    num_params = sum(math.prod(s.shape) for s in specs)
    stages, kinds = [], []
    for index, (layers, held) in enumerate(zip(stage_layers(config.num_layers, pp), stage_specs(config, pp))):
        sizes = [(s, spec_bytes(s, fmt, config, tp)) for s in held]
        replicated = sum(b for s, b in sizes if tp > 1 and spec_bytes(s, fmt, config, 1) == b)
        streamed = sum(b for s, b in sizes if not is_gathered_only(s, index, config, pp))
        stages.append(StageWeights(layers, sum(b for _, b in sizes), streamed, replicated))
        by_kind: dict = {}
        for s, b in sizes:
            by_kind[s.kind.value] = by_kind.get(s.kind.value, 0) + b
        kinds.append(by_kind)
    largest = max(range(pp), key=lambda i: stages[i].bytes)
    return WeightReport(num_params, total, tuple(stages), kinds[largest])
