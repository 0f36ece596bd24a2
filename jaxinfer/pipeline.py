"""Pipeline parallelism: layers in contiguous stages over the mesh's `pipe` axis, micro-batches in flight.

One engine step's batch is cut into M micro-batches (contiguous runs of the scheduled sequences, balanced by
token count; a sequence's tokens never straddle two). Inside the step's SPMD program (shard_map over the mesh),
tick t runs micro-batch t - s on stage s, then hands every stage's activations to the next stage with one
collective-permute (point-to-point; a stage only talks to its neighbour). So after the first PP - 1 ticks all
stages work at once, on different micro-batches: the step takes M + PP - 1 ticks for M micro-batches' worth of
work, a bubble of (PP - 1) / (M + PP - 1) (benchmarks/pipeline.py measures it). A stage whose tick has no
micro-batch (the pipeline filling or draining, or a micro-batch left empty) skips its layers (`lax.cond`).

Each stage owns its layers' weights and KV pages (stacked [pipe, ...] and sharded on `pipe`, see
jaxinfer/sharding.py); tensor parallelism runs inside each stage. Micro-batches are independent (each reads and
writes only its own sequences' pages), so the scheduler, the block pool and async scheduling are unchanged: this
is GPipe-style micro-batching inside a step, where vLLM instead keeps one scheduler batch per stage in flight.
The final hidden rows live on the last stage; one all-reduce over `pipe` hands them to every device, which runs
its slice of the vocab-parallel LM head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxinfer.batch import SeqChunk, StepBatch, bucket, build_step_batch
from jaxinfer.model import DecoderLayer, LlamaModel, embed_tokens, final_logits, layer_packing, step_tables
from jaxinfer.sharding import PIPE


@struct.dataclass
class PipelineBatch:
    """A step batch as M micro-batches of T_m tokens and S_m sequence rows. Outputs are in the order of the
    scheduled chunks ("chunk order"), as for a plain StepBatch, so the sampler and the engine see no difference."""
    mb: StepBatch                # every field stacked [M, ...]
    row_index: jax.Array         # [M * S_m] chunk-order sequence row -> its row in micro-batch order
    token_index: jax.Array       # [M * T_m] chunk-order token -> its position in micro-batch order
    logits_indices: jax.Array    # [M * S_m] chunk-order index of each sequence's last token (for all-token logits)
    num_microbatches: jax.Array  # [1] micro-batches that hold tokens; later ones are skipped

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]


def split_microbatches(chunks: list[SeqChunk], num_microbatches: int) -> list[list[SeqChunk]]:
    """Contiguous groups of chunks with about equal token counts (cut where the running total passes each
    1/M of the whole). Fewer chunks than M leave the last groups empty."""
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[SeqChunk]] = [[] for _ in range(num_microbatches)]
    done = 0
    for c in chunks:
        g = min(num_microbatches - 1, done * num_microbatches // max(total, 1))
        groups[g].append(c)
        done += len(c.token_ids)
    return [g for g in groups if g] + [[] for g in groups if not g]


def build_pipeline_batch(chunks: list[SeqChunk], *, num_microbatches: int, buckets: tuple[int, ...],
                         max_num_seqs: int, max_blocks: int, block_size: int, num_blocks: int,
                         min_tokens: int = 0) -> PipelineBatch:
    """Host side: split, pad every micro-batch to one bucketed shape, stack, and record where each chunk's rows
    and tokens went."""
    groups = split_microbatches(chunks, num_microbatches)
    m = num_microbatches
    per_mb = max([sum(len(c.token_ids) for c in g) for g in groups] + [-(-min_tokens // m), 1])
    num_tokens = bucket(per_mb, buckets)
    num_seqs = min(num_tokens, max_num_seqs)
    batches = [build_step_batch(g, num_tokens=num_tokens, num_seqs=num_seqs, max_blocks=max_blocks,
                                block_size=block_size, num_blocks=num_blocks) for g in groups]
    mb = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
    row_index = np.zeros(m * num_seqs, np.int32)
    token_index = np.zeros(m * num_tokens, np.int32)
    logits_indices = np.zeros(m * num_seqs, np.int32)
    row = offset = 0
    for g, group in enumerate(groups):
        local = 0
        for i, c in enumerate(group):
            n = len(c.token_ids)
            row_index[row] = g * num_seqs + i
            token_index[offset:offset + n] = g * num_tokens + local + np.arange(n)
            logits_indices[row] = offset + n - 1
            row, offset, local = row + 1, offset + n, local + n
    return PipelineBatch(mb, row_index, token_index, logits_indices,
                         np.array([sum(1 for g in groups if g)], np.int32))


def pipeline_forward(model: LlamaModel, pp: int, params: dict, kv_cache, batch: PipelineBatch,
                     all_logits: bool = False):
    """Inside shard_map over (pipe, tensor): this device's stage runs its layers on each micro-batch in turn.
    `model` carries one shard's config (layers_per_stage layers) and axes; params hold the global leaves
    (embedding, final norm, LM head: vocab shards) and layers_0.. with a leading stage axis of 1, as does each
    KV page array. Returns (logits of this device's vocab slice, in chunk order; new kv_cache)."""
    c, mb = model.config, batch.mb
    num_mb, tokens_per_mb = mb.token_ids.shape
    w = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [jax.tree_util.tree_map(lambda a: a[0], params[f"layers_{j}"]) for j in range(c.num_layers)]
    kv = tuple((k[0], v[0]) for k, v in kv_cache)
    x0 = embed_tokens(w, mb.token_ids.reshape(-1), c, model.dtype, model.axes)
    x0 = x0.reshape(num_mb, tokens_per_mb, -1)
    stage, last = lax.axis_index(PIPE), pp - 1
    rows = tokens_per_mb if all_logits else mb.logits_indices.shape[1]

    def run_stage(x, kv, b: StepBatch):
        cos, sin, plan = step_tables(c, b, kv[0][1].shape[2], model.attention_backend)
        new = []
        for j, p in enumerate(layers):
            layer = DecoderLayer(c, j, model.dtype, model.attention_backend, model.matmul_backend,
                                 layer_packing(model.packing, j), model.axes.tensor, quant_plan=model.quant_plan)
            x, pair = layer.apply({"params": p}, x, kv[j], b, cos, sin, plan)
            new.append(pair)
        return x, tuple(new)

    def tick(carry, t):
        kv, received, outs = carry
        m = t - stage  # the micro-batch this stage works on at tick t
        valid = (m >= 0) & (m < batch.num_microbatches[0])
        m = jnp.clip(m, 0, num_mb - 1)
        b = jax.tree_util.tree_map(lambda a: a[m], mb)
        x = jnp.where(stage == 0, x0[m], received)
        y, kv = lax.cond(valid, lambda kv: run_stage(x, kv, b), lambda kv: (x, kv), kv)
        out = y if all_logits else y[b.logits_indices]
        outs = jnp.where(valid & (stage == last), lax.dynamic_update_index_in_dim(outs, out, m, 0), outs)
        received = lax.ppermute(y, PIPE, [(s, s + 1) for s in range(pp - 1)])  # to the next stage
        return (kv, received, outs), None

    init = (kv, jnp.zeros_like(x0[0]), jnp.zeros((num_mb, rows, x0.shape[-1]), x0.dtype))
    (kv, _, outs), _ = lax.scan(tick, init, jnp.arange(num_mb + pp - 1))
    outs = lax.psum(jnp.where(stage == last, outs, 0), PIPE).reshape(num_mb * rows, -1)
    x = outs[batch.token_index if all_logits else batch.row_index]
    logits = final_logits(w, x, c, model.axes, model.matmul_backend, model.quant_plan)
    return logits, tuple((k[None], v[None]) for k, v in kv)
