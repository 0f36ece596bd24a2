"""Where every tensor lives on a `jax.sharding.Mesh`: the logical-axis rules, the attention-head layout for
tensor parallelism, weight placement straight into shards, and the KV pages' sharding.

The mesh has two named axes, `pipe` (pipeline stages) and `tensor` (Megatron tensor parallelism). Each parameter's
`jaxinfer.params.ParamSpec` names the logical axis of every dimension; `RULES` maps logical axes to mesh axes, so
changing the mesh (or the rules), never the model, changes the layout:

  vocab     -> (pipe, tensor)  embedding and LM head split over every device (vocab-parallel)
  embed     -> replicated      the residual stream is whole on every device
  q_heads   -> tensor          q column-parallel, o row-parallel
  kv_heads  -> tensor          k/v column-parallel; the KV pages split by head
  mlp       -> tensor          gate/up column-parallel, down row-parallel
  stage     -> pipe            decoder layers stacked by pipeline stage (pipeline_parallel_size > 1)

Heads that do not split evenly (fewer KV heads than the tensor degree, or counts that do not divide) are laid out
by `head_layout`: KV heads are replicated and query heads padded with zero heads at load time, which keeps the
math exact (a zero query head attends to something, and its zero rows of the o projection drop the result).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.params import (EMBED, KV_HEADS, MLP, Q_HEADS, VOCAB, ParamSpec, iter_leaves, layer_specs,
                             model_specs, set_leaf)
from jaxinfer.quantization.weight import QuantizedWeight

PIPE, TENSOR = "pipe", "tensor"
STAGE = "stage"  # logical axis of decoder layers stacked by pipeline stage

RULES: dict[str, tuple[str, ...]] = {
    VOCAB: (PIPE, TENSOR),
    EMBED: (),
    Q_HEADS: (TENSOR,),
    KV_HEADS: (TENSOR,),
    MLP: (TENSOR,),
    STAGE: (PIPE,),
}


class ShardingError(ValueError):
    """A model (or quantized weight) cannot be laid out on the requested mesh; the message says why."""


def make_mesh(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, devices=None) -> Mesh:
    """A (pipe, tensor) mesh over the first tp * pp devices of all processes. `jax.devices()` lists devices
    process by process, so each stage's tensor group stays inside one host whenever tp divides a host's count."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ShardingError(f"tensor_parallel_size={tp} and pipeline_parallel_size={pp} must be >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp * pp:
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
                if devices and devices[0].platform == "cpu" else "")
        raise ShardingError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {tp * pp} devices, "
                            f"found {len(devices)}{hint}")
    if jax.process_count() > 1 and len(devices) != tp * pp:
        raise ShardingError(f"a multi-process run must use every device: tensor_parallel_size x "
                            f"pipeline_parallel_size = {tp * pp}, devices = {len(devices)}")
    return Mesh(np.array(devices[:tp * pp], dtype=object).reshape(pp, tp), (PIPE, TENSOR))


# ---------------------------------------------------------------------------------------------- head layout
@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Attention heads as laid out for `tp` tensor shards. KV slot j holds the model's KV head kv_src[j]
    (a head in several slots is replicated); each slot owns `group` consecutive query heads, q_src[i] being the
    model's query head in padded position i, or -1 for a zero head. Shard t holds slots
    [t * len(kv_src) / tp, (t + 1) * len(kv_src) / tp) and their query heads."""
    q_src: tuple[int, ...]
    kv_src: tuple[int, ...]

    @property
    def group(self) -> int:
        return len(self.q_src) // len(self.kv_src)

    @property
    def is_identity(self) -> bool:
        return self.q_src == tuple(range(len(self.q_src))) and self.kv_src == tuple(range(len(self.kv_src)))


def head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    """Split heads over `tp` shards without changing the math.

    Each shard gets ceil(KVH / tp) KV slots; the tp * slots slots take the KV heads in order, a head taking
    several consecutive slots when there are more slots than heads (replication). A KV head's query heads are
    split into contiguous runs over its replicas, and every slot is padded to the same number of query heads with
    zero heads. So KVH % tp == 0 is a plain split (Llama-3-8B at TP 2/4/8), tp % KVH == 0 replicates each KV head
    tp / KVH times (Llama-3-70B at TP 16), and SmolLM2's 9 query / 3 KV heads become 12 query heads over 4 KV
    slots at TP 2 or 4 (KV head 0 replicated twice) and 16 over 8 at TP 8."""
    group = num_heads // num_kv_heads
    slots = -(-num_kv_heads // tp) * tp
    kv_src = tuple(j * num_kv_heads // slots for j in range(slots))
    replicas = Counter(kv_src)
    per_slot = max(-(-group // r) for r in replicas.values())
    q_src: list[int] = []
    for j, head in enumerate(kv_src):
        replica = j - kv_src.index(head)
        run = -(-group // replicas[head])
        heads = [head * group + i for i in range(replica * run, min((replica + 1) * run, group))]
        q_src += heads + [-1] * (per_slot - len(heads))
    return HeadLayout(tuple(q_src), kv_src)


def stage_layers(num_layers: int, pp: int) -> tuple[range, ...]:
    """Contiguous layer ranges of the pipeline stages; the first num_layers % pp stages get one layer more."""
    base, extra = divmod(num_layers, pp)
    starts = [s * base + min(s, extra) for s in range(pp + 1)]
    return tuple(range(starts[s], starts[s + 1]) for s in range(pp))


# ------------------------------------------------------------------------------------------------ the plan
class ShardingPlan:
    """How one model is laid out on one mesh: shapes as stored (heads padded / replicated, vocab padded),
    partition specs, placement of loaded tensors, the KV cache, and the shape of one shard (`local_config`),
    which is what the model sees inside `shard_map`."""

    def __init__(self, config: ModelConfig, mesh: Mesh | AbstractMesh, rules: dict[str, tuple[str, ...]] = RULES):
        """mesh: the devices; an `AbstractMesh` (sizes only) gives the layout without devices (the planner)."""
        self.config, self.mesh, self.rules = config, mesh, dict(rules)
        self.pp, self.tp = mesh.shape[PIPE], mesh.shape[TENSOR]
        c, hd = config, config.head_dim
        self.heads = head_layout(c.num_heads, c.num_kv_heads, self.shards(Q_HEADS))
        if self.shards(KV_HEADS) != self.shards(Q_HEADS):
            raise ShardingError("the rules must split q_heads and kv_heads over the same mesh axes")
        vocab_shards = self.shards(VOCAB)
        self.padded_vocab = -(-c.vocab_size // vocab_shards) * vocab_shards
        if c.intermediate_size % self.shards(MLP):
            raise ShardingError(f"intermediate_size={c.intermediate_size} does not split over "
                                f"{self.shards(MLP)} tensor shards")
        if self.pp > c.num_layers:
            raise ShardingError(f"pipeline_parallel_size={self.pp} exceeds the model's {c.num_layers} layers")
        self.stages = stage_layers(c.num_layers, self.pp)
        self.layers_per_stage = len(self.stages[0])
        self._index = {  # logical axis -> element index map (source position per stored position; -1 = zero)
            Q_HEADS: _expand(self.heads.q_src, hd), KV_HEADS: _expand(self.heads.kv_src, hd),
            VOCAB: np.concatenate([np.arange(c.vocab_size), -np.ones(self.padded_vocab - c.vocab_size, int)]),
        }
        self._index = {k: (None if np.array_equal(v, np.arange(len(v))) else v) for k, v in self._index.items()}
        self.local_config = dataclasses.replace(
            c, num_heads=len(self.heads.q_src) // self.tp, num_kv_heads=len(self.heads.kv_src) // self.tp,
            intermediate_size=c.intermediate_size // self.shards(MLP), vocab_size=self.padded_vocab // vocab_shards,
            num_layers=self.layers_per_stage if self.pp > 1 else c.num_layers)

    # ---- rules
    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes a logical axis is split over, leaving out axes of size 1."""
        return tuple(a for a in self.rules.get(logical, ()) if self.mesh.shape[a] > 1) if logical else ()

    def shards(self, logical: str) -> int:
        return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical))

    def stored_size(self, logical: str | None, size: int) -> int:
        """A dimension of `size` along a logical axis, as stored: query / KV heads padded or replicated by the
        head layout, the vocabulary padded to the vocab shards. `size` may count rows of a packed weight (code
        words, quantization groups) along that axis: they scale alike."""
        index = self._index.get(logical) if logical else None
        if index is None:
            return size
        c = self.config
        whole = {Q_HEADS: c.num_heads * c.head_dim, KV_HEADS: c.num_kv_heads * c.head_dim, VOCAB: c.vocab_size}
        return size * len(index) // whole[logical]

    def _entry(self, logical):
        axes = self.mesh_axes(logical)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    def partition_spec(self, spec: ParamSpec) -> P:
        """The parameter's PartitionSpec as one array (a layer's own weight; see `stored_spec` for PP)."""
        return P(*(self._entry(a) for a in spec.axes))

    def stored_spec(self, spec: ParamSpec) -> P:
        """As stored: with pipeline stages, decoder-layer parameters are stacked [pipe, ...] across stages."""
        pspec = self.partition_spec(spec)
        return P(self._entry(STAGE), *pspec) if self._stage_of(spec) is not None else pspec

    @property
    def vocab_axes(self) -> tuple[str, ...]:
        return self.mesh_axes(VOCAB)

    @property
    def tensor_axis(self) -> str | None:
        axes = self.mesh_axes(Q_HEADS)
        return axes[0] if axes else None

    def kv_partition_spec(self) -> P:
        """KV pages [(stage,) kv slots, blocks, ...]: split by KV head over the tensor axis (and by stage)."""
        heads = self._entry(KV_HEADS)
        return P(self._entry(STAGE), heads, None, None, None) if self.pp > 1 else P(heads, None, None, None)

    # ---- placement
    def place(self, spec: ParamSpec, value):
        """Lay out one loaded tensor (host numpy in jaxinfer's layout, already in its dtype; or a QuantizedWeight
        of them) and put each device's slice on that device only (`jax.make_array_from_callback`). A decoder
        layer's parameter goes to its pipeline stage's devices, with a leading stage axis of 1 (`finish` stacks
        the stages). This is the `place` hook of `loaders.common.build_params`."""
        if isinstance(value, QuantizedWeight):
            return self._place_quantized(spec, value)
        arr = np.asarray(value)
        for dim, axis in enumerate(spec.axes):
            arr = _remap(arr, self._index.get(axis), dim)
        return self._put(spec, arr, self.partition_spec(spec))

    def _put(self, spec: ParamSpec, arr: np.ndarray, pspec: P):
        for dim, entry in enumerate(pspec):
            n = math.prod(self.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
            if arr.shape[dim] % n:
                raise ShardingError(f"{spec.key}: dimension {dim} of shape {arr.shape} does not split over {n} "
                                    "devices")
        stage = self._stage_of(spec)
        if stage is None:
            sharding, host = NamedSharding(self.mesh, pspec), arr
        else:
            sharding, host = NamedSharding(self._stage_mesh(stage), P(None, *pspec)), arr[None]
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index], dtype=host.dtype)

    def _place_quantized(self, spec: ParamSpec, w: QuantizedWeight):
        """Packed leaves shard along the weight's own logical axes: codes [K(/8), N], scales and offsets
        [K / group, N], perm [K]. Row-parallel (K split) needs whole code words and whole groups per shard; a
        group larger than a shard's rows is cut into per-shard groups (the same scale repeated: exact)."""
        k_axis, n_axis = spec.axes
        leaves = {f: None if getattr(w, f) is None else np.asarray(getattr(w, f))
                  for f in ("qweight", "scales", "offsets", "perm")}
        group, bits, rows = w.group_size, w.bits, 8 if w.bits == 4 else 1
        n_index = self._index.get(n_axis)
        for f in ("qweight", "scales", "offsets"):
            leaves[f] = _remap(leaves[f], n_index, 1) if leaves[f] is not None else None
        k_index = self._index.get(k_axis)
        if k_index is not None:  # padded / replicated heads on the input side (o_proj at an uneven TP)
            if leaves["perm"] is not None:
                raise ShardingError(f"{spec.key}: an act-order permutation cannot be combined with padded heads at "
                                    f"tensor_parallel_size={self.tp}")
            leaves["qweight"] = _remap(leaves["qweight"], _coarsen(k_index, rows, spec, "code word"), 0)
            for f in ("scales", "offsets"):
                if leaves[f] is not None:
                    leaves[f] = _remap(leaves[f], _coarsen(k_index, group, spec, "quantization group"), 0)
        k = (len(k_index) if k_index is not None else w.shape[0])
        shards = self.shards(k_axis)
        if shards > 1:
            local = k // shards
            if local % rows:
                raise ShardingError(f"{spec.key}: int4 codes pack 8 rows per word; {local} rows per shard "
                                    f"({k} / {shards}) is not a multiple of 8")
            if group > local and group % local == 0:  # one group spans several shards: per-shard groups
                for f in ("scales", "offsets"):
                    if leaves[f] is not None:
                        leaves[f] = np.repeat(leaves[f], group // local, axis=0)
                group = local
            elif local % group:
                raise ShardingError(f"{spec.key} is row-parallel over {shards} shards ({local} input rows each) but "
                                    f"its quantization group size {group} neither divides nor is a multiple of "
                                    f"{local}; requantize with a group size that divides {local}")
            if leaves["perm"] is not None:
                perm = leaves["perm"]
                if not np.array_equal(perm // local, np.arange(k) // local):
                    raise ShardingError(f"{spec.key}: its act-order permutation moves input rows across the "
                                        f"{shards} tensor shards of a row-parallel layer; requantize without "
                                        "act-order (desc_act) or use tensor_parallel_size=1")
                leaves["perm"] = perm % local  # each shard permutes its own slice of the input
        pspec = self.partition_spec(spec)
        placed = {f: None if v is None else self._put(spec, v, pspec if f != "perm" else P(pspec[0]))
                  for f, v in leaves.items()}
        return QuantizedWeight(**placed, bits=bits, group_size=group)

    def finish(self, params: dict) -> dict:
        """After every tensor is placed: with pipeline stages, stack each local layer slot across stages into
        one [pipe, ...] array (no data moves: the stacked array is made of the stage arrays' shards). A stage with
        fewer layers than the others gets zero layers in its last slots, which are identities (a residual block
        whose output projections are zero adds nothing)."""
        if self.pp == 1:
            return params
        out = {k: v for k, v in params.items() if not k.startswith("layers_")}
        for j in range(self.layers_per_stage):
            slot = {}
            for spec in layer_specs(self.config, 0):
                pieces = [params[f"layers_{r[j]}"][spec.name] if j < len(r) else None for r in self.stages]
                slot[spec.name] = self._stack(spec, pieces)
            out[f"layers_{j}"] = slot
        return out

    def _stack(self, spec: ParamSpec, pieces: list):
        template = pieces[0]
        leaves, treedef = jax.tree_util.tree_flatten(template)
        per_stage = []
        for s, piece in enumerate(pieces):
            if piece is None:
                piece = jax.tree_util.tree_map(lambda a, s=s: self._zeros_on_stage(a, s), template)
            if jax.tree_util.tree_structure(piece) != treedef:
                raise ShardingError(f"layer slot {spec.key}: pipeline stages must pack their layers alike "
                                    f"(got {treedef} and {jax.tree_util.tree_structure(piece)})")
            per_stage.append(jax.tree_util.tree_leaves(piece))
        stacked = []
        for i, leaf in enumerate(leaves):
            sharding = NamedSharding(self.mesh, P(self._entry(STAGE), *leaf.sharding.spec[1:]))
            shape = (self.pp, *leaf.shape[1:])
            by_device = {shard.device: shard.data for stage in per_stage for shard in stage[i].addressable_shards}
            arrays = [by_device[d] for d in sharding.addressable_devices_indices_map(shape)]
            stacked.append(jax.make_array_from_single_device_arrays(shape, sharding, arrays, dtype=leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, stacked)

    def _zeros_on_stage(self, like: jax.Array, stage: int):
        sharding = NamedSharding(self._stage_mesh(stage), like.sharding.spec)
        return jax.make_array_from_callback(
            like.shape, sharding, lambda index: np.zeros(_sliced_shape(like.shape, index), like.dtype),
            dtype=like.dtype)

    def shard_params(self, params: dict) -> dict:
        """Lay out a weight pytree that is already in memory (random or quantized weights in tests, or weights
        loaded elsewhere): every declared parameter through `place`, then `finish`."""
        out: dict = {}
        for spec, value in iter_leaves(params, model_specs(self.config)):
            if not isinstance(value, QuantizedWeight):
                value = np.asarray(value)
            set_leaf(out, spec, self.place(spec, value))
        return self.finish(out)

    def param_specs(self, params) -> object:
        """The PartitionSpec of every leaf of a placed weight pytree (shard_map's in_specs)."""
        return jax.tree_util.tree_map(lambda a: a.sharding.spec, params)

    def _stage_of(self, spec: ParamSpec) -> int | None:
        if self.pp == 1 or not spec.path[0].startswith("layers_"):
            return None
        layer = int(spec.path[0].split("_")[1])
        return next(s for s, r in enumerate(self.stages) if layer in r)

    def _stage_mesh(self, stage: int) -> Mesh:
        return Mesh(self.mesh.devices[stage:stage + 1], (PIPE, TENSOR))

    # ---- KV cache
    @property
    def kv_slots(self) -> int:
        return len(self.heads.kv_src)

    def init_kv_cache(self, num_blocks: int, block_size: int, dtype, keys_transposed: bool):
        """Per local layer (k_pages, v_pages), created sharded (each device allocates only its slots' pages):
        [(pipe,) kv slots, blocks, block_size, head_dim], K with the last two axes swapped for the XLA path."""
        hd, lead = self.config.head_dim, ((self.pp,) if self.pp > 1 else ())
        v_shape = (*lead, self.kv_slots, num_blocks, block_size, hd)
        k_shape = (*lead, self.kv_slots, num_blocks, hd, block_size) if keys_transposed else v_shape
        sharding = NamedSharding(self.mesh, self.kv_partition_spec())
        make = jax.jit(lambda: (jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)),
                       out_shardings=(sharding, sharding))
        return tuple(make() for _ in range(self.local_config.num_layers))

    def describe(self) -> str:
        h = self.heads
        padded = f", {len(h.q_src) - self.config.num_heads} of them zero" if len(h.q_src) > self.config.num_heads \
            else ""
        layout = "heads split evenly" if h.is_identity else (
            f"{self.config.num_heads} query / {self.config.num_kv_heads} KV heads laid out as {len(h.q_src)} "
            f"query heads{padded} over {len(h.kv_src)} KV slots (KV heads replicated)")
        stages = "" if self.pp == 1 else f", stages of {[len(r) for r in self.stages]} layers"
        return f"mesh pipe={self.pp} x tensor={self.tp}: {layout}{stages}"


def per_device_bytes(tree) -> dict:
    """Bytes each device holds of the arrays in `tree` (measured on their shards)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ----------------------------------------------------------------------------------------------- helpers
def _expand(heads, head_dim: int) -> np.ndarray:
    """Head index map -> element index map over heads x head_dim."""
    h = np.asarray(heads)[:, None]
    return np.where(h >= 0, h * head_dim + np.arange(head_dim)[None, :], -1).reshape(-1)


def _remap(arr: np.ndarray, index, axis: int) -> np.ndarray:
    """arr with positions along `axis` taken from `index` (-1: zeros)."""
    if index is None:
        return arr
    out = np.take(arr, np.maximum(index, 0), axis=axis)
    if (index < 0).any():
        shape = [1] * arr.ndim
        shape[axis] = len(index)
        out = np.where((index >= 0).reshape(shape), out, np.zeros((), arr.dtype))
    return out


def _coarsen(index: np.ndarray, factor: int, spec: ParamSpec, unit: str) -> np.ndarray:
    """An element index map as a map over runs of `factor` elements (packed words, quantization groups)."""
    runs = index.reshape(-1, factor)
    first = runs[:, :1]
    whole = np.all(runs == first + np.arange(factor), axis=1) & (first[:, 0] % factor == 0)
    if not (whole | np.all(runs == -1, axis=1)).all():
        raise ShardingError(f"{spec.key}: padded or replicated heads must move whole {unit}s of {factor} rows; "
                            "use a tensor_parallel_size that splits the heads evenly, or a quantization group "
                            "that divides head_dim")
    return np.where(first[:, 0] >= 0, first[:, 0] // factor, -1)


def _sliced_shape(shape, index) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
