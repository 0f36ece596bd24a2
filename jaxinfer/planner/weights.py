"""Weight bytes, counted from the parameter declarations (jaxinfer.params), whole and per device.

Each declared parameter is stored as one array (plain weights, norms, biases) or, when quantized, as the leaves
of a `QuantizedWeight` built by `QuantLayout.zeros` (packed codes, scales, optional f32 offsets, optional act-order
permutation): the planner asks JAX for those leaves' shapes (`jax.eval_shape`), so it counts exactly what
`jaxinfer.quantization` stores. Only LINEAR parameters are quantized (as GPTQ/AWQ checkpoints do); the embedding
and LM head stay at the head dtype, norms and biases at the float dtype.

Per device: the engine's own layout (`jaxinfer.sharding.ShardingPlan` on a device-free `AbstractMesh`) says how
each logical axis is stored (heads padded or replicated by the head layout, the vocabulary padded) and into how
many shards the rules split it (`shard_count`), and `stage_specs` which parameters each device of a pipeline
stage holds. So the planner cannot drift from what the engine places (tests/multidevice/test_planner_layout.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jax.sharding import AbstractMesh

from jaxinfer import sharding
from jaxinfer.config import ModelConfig
from jaxinfer.params import Kind, ParamSpec, global_specs, layer_specs, model_specs
from jaxinfer.quantization.weight import QuantLayout

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
        # Asymmetric codes carry f32 offsets (what `quantization.quantize` stores).
        return QuantLayout(QUANT_BITS[self.dtype], self.group_size, self.scale_dtype,
                           None if self.symmetric else "float32", self.act_order)

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


# ------------------------------------------------------------------------------------ the engine's layout

@functools.lru_cache(maxsize=None)
def layout(config: ModelConfig, tp: int, pp: int = 1) -> sharding.ShardingPlan:
    """The engine's layout of this model on a (pp, tp) mesh, without devices. Raises ValueError (ShardingError)
    where the engine would refuse (an MLP that does not split, more stages than layers)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size={tp} and pipeline_parallel_size={pp} must be >= 1")
    return sharding.ShardingPlan(config, AbstractMesh((pp, tp), (sharding.PIPE, sharding.TENSOR)))


def shard_count(axis: str, config: ModelConfig, tp: int, pp: int = 1) -> int:
    """Into how many pieces jaxinfer.sharding's rules split a dimension of logical axis `axis` on a (pp, tp)
    mesh: the tensor degree for heads and the MLP, every device for the vocabulary, 1 for `embed`."""
    return layout(config, tp, pp).shards(axis)


def device_shape(shape: tuple[int, ...], axes: tuple[str, ...], config: ModelConfig, tp: int,
                 pp: int = 1) -> tuple[int, ...]:
    """The shape one device holds of an array with these logical axes (as stored: padded heads, padded vocab)."""
    plan, out = layout(config, tp, pp), []
    for dim, axis in zip(shape, axes):
        stored, n = plan.stored_size(axis, dim), plan.shards(axis)
        if stored % n:
            raise ValueError(f"a dimension of size {stored} on axis {axis!r} does not split {n} ways (a quantized "
                             "weight's groups or packed rows must divide the shard)")
        out.append(stored // n)
    return tuple(out)


def kv_heads_per_device(config: ModelConfig, tp: int) -> int:
    """KV slots per device (a KV head replicated when there are fewer heads than the tensor degree)."""
    return layout(config, tp).local_config.num_kv_heads


def q_heads_per_device(config: ModelConfig, tp: int) -> int:
    """Query heads per device, counting the zero heads that pad an uneven split (they are computed)."""
    return layout(config, tp).local_config.num_heads


def kv_heads_replicated(config: ModelConfig, tp: int) -> bool:
    return len(layout(config, tp).heads.kv_src) > config.num_kv_heads


def query_heads_padded(config: ModelConfig, tp: int) -> int:
    """Zero query heads the layout adds."""
    return len(layout(config, tp).heads.q_src) - config.num_heads


# -------------------------------------------------------------------------------------- pipeline parallel

def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (earlier stages take the extra)."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} must be between 1 and the number of layers ({num_layers})")
    return list(sharding.stage_layers(num_layers, pp))


def stage_specs(config: ModelConfig, pp: int) -> list[list[ParamSpec]]:
    """The parameters each device of a stage holds, as the engine lays them out: the embedding, final norm and
    LM head on every device (vocab-parallel over all of them; a tied model's one matrix serves the lookup and
    the head), and as many layer slots as the largest stage has: a shorter stage's last slots hold zero layers
    (identities) of the same size."""
    stages = stage_layers(config.num_layers, pp)
    slots = len(stages[0])
    return [list(global_specs(config)) + [p for i in layers for p in layer_specs(config, i)]
            + [p for _ in range(slots - len(layers)) for p in layer_specs(config, layers[0])]
            for layers in stages]


# ------------------------------------------------------------------------------------------------ report

def spec_bytes(spec: ParamSpec, fmt: WeightFormat, config: ModelConfig, tp: int = 1, pp: int = 1) -> int:
    """Bytes of one parameter on one device of a (pp, tp) mesh (1, 1: the whole parameter)."""
    if tp == pp == 1:
        return sum(math.prod(shape) * size for shape, _, size in stored_arrays(spec, fmt))
    return sum(math.prod(device_shape(shape, axes, config, tp, pp)) * size
               for shape, axes, size in stored_arrays(spec, fmt))


def is_gathered_only(spec: ParamSpec) -> bool:
    """A table a step only gathers rows of (an untied embedding), so decode does not stream it from memory."""
    return spec.name == "embed"


@dataclasses.dataclass(frozen=True)
class StageWeights:
    layers: range
    bytes: int             # on one device of this stage
    streamed_bytes: int    # what a step's matmuls read (all but gathered-only tables)
    replicated_bytes: int  # of `bytes`, tensors the tensor axis does not split (norms of the residual stream)


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
    for layers, held in zip(stage_layers(config.num_layers, pp), stage_specs(config, pp)):
        sizes = [(s, spec_bytes(s, fmt, config, tp, pp)) for s in held]
        replicated = sum(b for s, b in sizes if tp > 1 and spec_bytes(s, fmt, config) == b)
        streamed = sum(b for s, b in sizes if not is_gathered_only(s))
        stages.append(StageWeights(layers, sum(b for _, b in sizes), streamed, replicated))
        by_kind: dict = {}
        for s, b in sizes:
            by_kind[s.kind.value] = by_kind.get(s.kind.value, 0) + b
        kinds.append(by_kind)
    largest = max(range(pp), key=lambda i: stages[i].bytes)
    return WeightReport(num_params, total, tuple(stages), kinds[largest])
