"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as Flax linen modules.

`LlamaModel.apply({"params": params}, kv_cache, batch)` is a pure function of the weights, the paged KV cache
and a flat ragged batch (docs/ARCHITECTURE.md). Prefill chunks and decodes of many sequences share one call.
Layers are unrolled with separate per-layer weights: on XLA CPU, slicing stacked weights copies them per step.

Under tensor / pipeline parallelism the same code runs inside `shard_map` on one shard's weights, with a config
of one shard's shapes (`ShardingPlan.local_config`) and `ShardAxes` naming the mesh axes of its collectives: one
all-reduce after the attention's o projection and one after the MLP's down projection (Megatron), and the
vocab-parallel embedding's all-reduce. `embed_tokens`, `DecoderLayer` and `final_logits` are the pieces the
pipeline (jaxinfer/pipeline.py) runs separately.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.attention import keys_transposed, paged_attention, plan_xla_attention, write_kv
from jaxinfer.batch import StepBatch
from jaxinfer.config import ModelConfig
from jaxinfer.layers import apply_rope, linear, rms_norm, rope_inv_freq, rope_tables
from jaxinfer.params import Kind, global_specs, layer_specs
from jaxinfer.quantization.weight import QuantizedWeight, dequantize_columns
from jaxinfer.quantization.xla_matmul import QuantMatmulPlan

class ShardAxes(NamedTuple):
    """The mesh axes a shard's collectives run over (inside shard_map); the defaults are one whole model."""
    tensor: str | None = None       # row-parallel projections are summed over it
    vocab: tuple[str, ...] = ()     # the vocabulary (embedding rows, LM head columns) is split over these
    vocab_size: int = 0             # the model's real vocabulary when the stored one is padded (0: not padded)


_INITS = {Kind.LINEAR: nn.initializers.normal(0.02), Kind.HEAD: nn.initializers.normal(0.02),
          Kind.NORM: nn.initializers.ones, Kind.BIAS: nn.initializers.zeros}


def _declare(module: nn.Module, specs, dtype, packing: dict) -> dict:
    """The module's parameters, declared from their specs: Flax checks every loaded leaf's shape against the
    declaration, including the packed leaves of a quantized weight (`packing`: name -> QuantLayout)."""
    out = {}
    for spec in specs:
        layout = packing.get(spec.name)
        init = (lambda _rng, shape, _dtype, layout=layout: layout.zeros(shape)) if layout else _INITS[spec.kind]
        out[spec.name] = module.param(spec.name, init, spec.shape, dtype)
    return out


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int
    dtype: jnp.dtype
    attention_backend: str
    matmul_backend: str
    packing: tuple = ()  # ((name, QuantLayout), ...): this layer's packed weights
    tensor_axis: str | None = None  # tensor parallelism: the mesh axis o and down projections are summed over
    quant_plan: QuantMatmulPlan | None = None  # XLA formulation per row count for packed weights

    @nn.compact
    def __call__(self, x, kv, batch: StepBatch, cos, sin, plan):
        c = self.config
        hd, h, kvh = c.head_dim, c.num_heads, c.num_kv_heads
        w = _declare(self, layer_specs(c, self.layer), self.dtype, dict(self.packing))
        lin = lambda v, name, bias=None: linear(v, w[name], w.get(bias), matmul_backend=self.matmul_backend,
                                                quant_plan=self.quant_plan)

        hn = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
        t = x.shape[0]
        q = lin(hn, "wq", "bq").reshape(t, h, hd)
        k = lin(hn, "wk", "bk").reshape(t, kvh, hd)
        v = lin(hn, "wv", "bv").reshape(t, kvh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pages, v_pages = write_kv(kv[0], kv[1], k, v, batch.slot_mapping,
                                    keys_transposed=keys_transposed(self.attention_backend))
        attn = paged_attention(q, k_pages, v_pages, batch, sm_scale=hd ** -0.5, sliding_window=c.sliding_window,
                               backend=self.attention_backend, plan=plan)
        x = x + self._all_reduce(lin(attn.reshape(t, h * hd), "wo"))

        hn = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
        x = x + self._all_reduce(lin(jax.nn.silu(lin(hn, "w_gate")) * lin(hn, "w_up"), "w_down"))
        return x, (k_pages, v_pages)

    def _all_reduce(self, partial):
        """Row-parallel projections give each shard a partial sum of the output: add them up (Megatron's one
        all-reduce per block)."""
        return lax.psum(partial, self.tensor_axis) if self.tensor_axis else partial


class LlamaModel(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "xla"
    matmul_backend: str = "xla"
    packing: tuple = ()  # ((spec key, QuantLayout), ...), e.g. (("layers_0/wq", layout), ...): packed weights
    axes: ShardAxes = ShardAxes()
    quant_plan: QuantMatmulPlan | None = None  # XLA formulation per row count for packed weights (cpu_probe)

    @nn.compact
    def __call__(self, kv_cache, batch: StepBatch, all_logits: bool = False):
        """Returns (logits [S, V] at batch.logits_indices — or [T, V] with all_logits —, new kv_cache)."""
        c = self.config
        packing = dict(self.packing)
        w = _declare(self, global_specs(c), self.dtype, {k: v for k, v in packing.items() if "/" not in k})
        x = embed_tokens(w, batch.token_ids, c, self.dtype, self.axes)
        cos, sin, plan = step_tables(c, batch, kv_cache[0][1].shape[2], self.attention_backend)
        new_cache = []
        for i in range(c.num_layers):
            layer = DecoderLayer(c, i, self.dtype, self.attention_backend, self.matmul_backend,
                                 layer_packing(self.packing, i), self.axes.tensor, quant_plan=self.quant_plan,
                                 name=f"layers_{i}")
            x, kv = layer(x, kv_cache[i], batch, cos, sin, plan)
            new_cache.append(kv)
        if not all_logits:
            x = x[batch.logits_indices]  # only the rows we sample from go through the LM head
        return final_logits(w, x, c, self.axes, self.matmul_backend, self.quant_plan), tuple(new_cache)


def layer_packing(packing: tuple, layer: int) -> tuple:
    """The packed weights of one layer, by name, from the model's ((spec key, layout), ...)."""
    prefix = f"layers_{layer}/"
    return tuple((k[len(prefix):], v) for k, v in packing if k.startswith(prefix))


def step_tables(config: ModelConfig, batch: StepBatch, block_size: int, attention_backend: str):
    """Per-step tables every layer shares: RoPE cos/sin and, on the XLA path, the attention plan."""
    cos, sin = rope_tables(batch.positions, rope_inv_freq(config))
    plan = None
    if attention_backend == "xla":
        plan = plan_xla_attention(batch, block_size=block_size, sliding_window=config.sliding_window)
    return cos, sin, plan


def embed_tokens(w: dict, token_ids, config: ModelConfig, dtype, axes: ShardAxes = ShardAxes()):
    """[T, hidden] embeddings. Vocab-parallel (axes.vocab): each shard looks up the ids in its slice of the
    vocabulary, zeros for the others, and one all-reduce adds the slices up."""
    lm_head = w["lm_head"]
    table_rows = lm_head.shape[1] if config.tie_word_embeddings else w["embed"].shape[0]
    ids, inside = token_ids, None
    if axes.vocab:
        ids = token_ids - lax.axis_index(axes.vocab) * table_rows
        inside = (ids >= 0) & (ids < table_rows)
        ids = jnp.where(inside, ids, 0)
    if config.tie_word_embeddings:
        # Tied models keep only the LM head's [hidden, vocab] layout: XLA CPU's bf16 dot is ~10x slower on a
        # transposed [vocab, hidden] operand, while gathering T columns for the lookup costs little. A packed
        # head dequantizes only the gathered columns.
        if isinstance(lm_head, QuantizedWeight):
            x = dequantize_columns(lm_head, ids, dtype)
        else:
            x = _gather_columns(lm_head, ids).astype(dtype)
    else:
        x = w["embed"][ids].astype(dtype)
    if axes.vocab:
        x = lax.psum(jnp.where(inside[:, None], x, 0), axes.vocab)
    return x


def final_logits(w: dict, x, config: ModelConfig, axes: ShardAxes = ShardAxes(), matmul_backend: str = "xla",
                 quant_plan: QuantMatmulPlan | None = None):
    """Final norm and LM head: f32 logits [rows, V] (this shard's vocabulary slice when vocab-parallel; ids past
    a padded vocabulary's real size get -inf)."""
    x = rms_norm(x, w["final_norm"], config.rms_norm_eps)
    # a packed head runs an exact formulation (f32 activations): the plan's, or "dequantize" without one
    logits = linear(x.astype(jnp.float32), w["lm_head"], matmul_backend=matmul_backend,
                    quant_plan=quant_plan and quant_plan.exact())
    if axes.vocab_size:
        local = logits.shape[-1]
        ids = jnp.arange(local) + (lax.axis_index(axes.vocab) * local if axes.vocab else 0)
        logits = jnp.where(ids < axes.vocab_size, logits, -jnp.inf)
    return logits


def _gather_columns(matrix, ids):
    """matrix[:, ids].T as one gather that yields [len(ids), rows] directly. (A transpose after the gather
    would give the residual stream a column-major layout, and XLA CPU then runs every bf16 dot in f32.)"""
    dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(1,), start_index_map=(1,))
    return jax.lax.gather(matrix, ids[:, None], dnums, slice_sizes=(matrix.shape[0], 1),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def init_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype, attention_backend: str = "xla"):
    """Per layer (k_pages, v_pages). V: [KVH, num_blocks, block_size, head_dim]; K the same, or with the last two
    axes swapped for the XLA path (attention.keys_transposed)."""
    v_shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    k_shape = (config.num_kv_heads, num_blocks, config.head_dim, block_size) if keys_transposed(attention_backend) \
        else v_shape
    return tuple((jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)) for _ in range(config.num_layers))
