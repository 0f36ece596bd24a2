"""`plan()`: memory and roofline of serving a model on a device, with the engine's own arithmetic.

Memory per device: the weights (jaxinfer.planner.weights, from the parameter declarations), the KV pool
(jaxinfer.kv_budget, the engine's formula: the budget is the allocator limit times the memory fraction minus the
weights, in whole blocks), and an activation / workspace estimate for the engine's largest step (below).
Performance: jaxinfer.planner.roofline.

Activation / workspace estimate: XLA reuses a layer's buffers for the next, so the peak is one layer's live
intermediates plus the LM head and sampler, for the largest step (max_num_batched_tokens tokens T,
S = min(T, max_num_seqs) sampled rows):
  attention phase  T * (2 D + 2 q_dim + 2 kv_dim) activations  (residual, normed input, q, k, v, attention out)
                   + T * q_heads * chunk f32 scores of the XLA path's online softmax (chunk = 4 blocks)
  MLP phase        T * (2 D + 3 I) activations                    (residual, normed input, gate, up, gate * up)
  head + sampler   3 * S * V * 4 bytes                            (f32 logits, log-softmax, one working copy)
  estimate         max(attention, MLP) + head + sampler, per device (q, kv, I and V at their per-device sizes).
`jaxinfer profile` measures the real figure (XLA's buffer assignment of the compiled step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax.numpy as jnp

from jaxinfer.attention import DEFAULT_CHUNK_BLOCKS
from jaxinfer.config import ModelConfig, list_presets, load_preset
from jaxinfer.kv_budget import kv_budget_bytes, num_kv_blocks, resolve_max_model_len
from jaxinfer.params import VOCAB
from jaxinfer.planner import roofline
from jaxinfer.planner.hardware import Accelerator, get_accelerator
from jaxinfer.planner.weights import (FLOAT_DTYPES, WeightFormat, canonical_dtype, dtype_bytes,
                                      kv_heads_per_device, kv_heads_replicated, layout, q_heads_per_device,
                                      query_heads_padded, shard_count, weight_report)

JAX_GPU_MEM_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default: the share of HBM JAX's allocator takes


def load_model_config(model: str | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset name (configs/models), an HF config.json file, or anything
    `open_checkpoint` opens (a registered name, random:<preset>, a GGUF file, an HF or orbax directory): only
    the config is read, never the weights."""
    if isinstance(model, ModelConfig):
        return model
    if model in list_presets():
        return load_preset(model)
    if model.endswith(".json") and os.path.isfile(model):
        with open(model) as f:
            return ModelConfig.from_hf_config(json.load(f), name=os.path.basename(os.path.dirname(model)) or model)
    from jaxinfer.loaders import open_checkpoint

    return open_checkpoint(model).config


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model: str | ModelConfig = "llama-3.1-8b"
    gpu: str | Accelerator = "H100-SXM"
    weight_dtype: str = "bfloat16"       # float32 / bfloat16 / float16 / int8 / int4
    group_size: int = 128                # int8 / int4: input rows per scale (-1: per output channel)
    symmetric: bool = True               # False: f32 offsets (zero points) stored beside the scales
    scale_dtype: str = "float16"
    act_order: bool = False              # GPTQ act-order: an int32 row permutation per weight
    dtype: str | None = None             # activations; None: float32 on CPU, bfloat16 on GPU (the engine's)
    kv_dtype: str | None = None          # None: the activation dtype
    head_dtype: str | None = None        # None: the wider of the weight and activation dtypes (the engine's)
    tp: int = 1
    pp: int = 1
    max_model_len: int | None = None     # None: min(model context, 2048), as the engine
    context_len: int | None = None       # context of the concurrent sequences and of decode; None: max_model_len
    prompt_len: int | None = None        # prefill prompt; None: context_len
    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None
    allocator_fraction: float = JAX_GPU_MEM_FRACTION
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    compute_dtype: str | None = None     # the peak FLOP/s figure used; None: fp32 on a CPU, else bf16


def _widest(*dtypes: str) -> str:
    return max(dtypes, key=lambda d: jnp.dtype(d).itemsize)


def activation_estimate(config: ModelConfig, tp: int, act_bytes: int, tokens: int, seqs: int,
                        block_size: int) -> int:
    """Bytes of the largest step's live intermediates on one device (see the module docstring)."""
    d, hd = config.hidden_size, config.head_dim
    q = q_heads_per_device(config, tp) * hd
    kv = kv_heads_per_device(config, tp) * hd
    local = layout(config, tp).local_config  # the engine's shard: padded heads, padded vocabulary slice
    mlp, vocab = local.intermediate_size, local.vocab_size
    attention = tokens * (2 * d + 2 * q + 2 * kv) * act_bytes + \
        tokens * q_heads_per_device(config, tp) * DEFAULT_CHUNK_BLOCKS * block_size * 4
    mlp_phase = tokens * (2 * d + 3 * mlp) * act_bytes
    return max(attention, mlp_phase) + 3 * min(tokens, seqs) * vocab * 4


def plan(req: PlanRequest) -> dict:
    """The plan as a JSON-ready dict: bytes as integers, times in seconds, rates per second."""
    config = load_model_config(req.model)
    device = get_accelerator(req.gpu) if isinstance(req.gpu, str) else req.gpu
    if req.tp < 1 or req.pp < 1:
        raise ValueError("tp and pp must be at least 1")
    act = canonical_dtype(req.dtype or ("float32" if device.platform == "cpu" else "bfloat16"))
    kv_dtype = canonical_dtype(req.kv_dtype or act)
    weight_dtype = canonical_dtype(req.weight_dtype)
    float_dtype = weight_dtype if weight_dtype in FLOAT_DTYPES else act
    head = canonical_dtype(req.head_dtype or _widest(float_dtype, act))
    fmt = WeightFormat(weight_dtype, head, float_dtype, req.group_size, req.symmetric, req.scale_dtype,
                       req.act_order)
    weights = weight_report(config, fmt, req.tp, req.pp)
    max_model_len = resolve_max_model_len(config.max_position_embeddings, req.max_model_len)
    context = req.context_len or max_model_len
    if context > max_model_len:
        raise ValueError(f"context_len={context} exceeds max_model_len={max_model_len}")
    prompt_len = req.prompt_len or context

    # ---- KV pool: the engine's budget on each stage's devices; the block pool is global, so the tightest wins.
    # Every device holds pages for as many layer slots as the largest stage has, and for its KV slots.
    kv_heads = kv_heads_per_device(config, req.tp)
    layer_slots = len(weights.stages[0].layers)
    limit = device.memory_bytes * req.allocator_fraction if device.platform != "cpu" else device.memory_bytes
    per_stage = []
    for stage in weights.stages:
        per_token = config.kv_bytes_per_token(dtype_bytes(kv_dtype), num_layers=layer_slots, num_kv_heads=kv_heads)
        stats = {"bytes_limit": limit, "bytes_in_use": stage.bytes} if device.platform != "cpu" else None
        budget = kv_budget_bytes(req.kv_cache_memory_gb, req.kv_cache_memory_fraction, stats,
                                 num_devices=req.tp * req.pp)
        blocks = req.num_kv_blocks or num_kv_blocks(budget, per_token * req.block_size, max_model_len,
                                                    req.block_size)
        per_stage.append((per_token, budget, blocks))
    num_blocks = min(b for _, _, b in per_stage)
    worst = max(range(req.pp), key=lambda i: weights.stages[i].bytes + num_blocks * per_stage[i][0] * req.block_size)
    kv_per_token_dev, budget = per_stage[worst][0], per_stage[worst][1]
    kv_alloc = num_blocks * req.block_size * kv_per_token_dev
    blocks_per_seq = math.ceil(context / req.block_size)
    forced = num_blocks * kv_per_token_dev * req.block_size > max(budget, 0) and not req.num_kv_blocks

    act_bytes = activation_estimate(config, req.tp, dtype_bytes(act), req.max_num_batched_tokens, req.max_num_seqs,
                                    req.block_size)
    used = weights.stages[worst].bytes + kv_alloc + act_bytes

    # ---- roofline
    compute_dtype = req.compute_dtype or ("fp32" if device.platform == "cpu" else "bf16")
    peak = device.peak_flops(compute_dtype)
    ridge = peak / device.bandwidth
    costs = roofline.stage_costs(config, weights, tp=req.tp, pp=req.pp, act_bytes=dtype_bytes(act),
                                 kv_dtype_bytes=dtype_bytes(kv_dtype), head_dtype_bytes=dtype_bytes(head))
    fit_seqs = num_blocks // blocks_per_seq
    batches = sorted(set(req.batch_sizes) | ({min(fit_seqs, req.max_num_seqs)} if fit_seqs else set()))
    seq_bytes_dev = blocks_per_seq * req.block_size * kv_per_token_dev
    decode = [dict(_step_dict(roofline.decode_step(costs, device, peak, req.tp, b, context), req.pp),
                   kv_bytes_per_device=b * seq_bytes_dev, fits=b <= fit_seqs) for b in batches]
    chunk = req.max_num_batched_tokens
    pre = _step_dict(roofline.prefill(costs, device, peak, req.tp, prompt_len, chunk), req.pp)
    ring = 2 * (req.tp - 1) / req.tp if req.tp > 1 else 0.0
    allreduce = sum(c.allreduce_bytes for c in costs)

    notes = _notes(config, req, device, kv_dtype, forced)
    return {
        "units": "bytes are exact integers; GiB = 2**30 bytes, GB = 1e9 bytes; rates per second (decimal)",
        "model": {"name": config.name, "num_params": weights.num_params, "num_layers": config.num_layers,
                  "hidden_size": config.hidden_size, "num_heads": config.num_heads,
                  "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                  "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
                  "tie_word_embeddings": config.tie_word_embeddings},
        "device": {"name": device.name, "memory_bytes": device.memory_bytes, "bandwidth_bytes_per_s": device.bandwidth,
                   "peak_flops": peak, "compute_dtype": compute_dtype, "interconnect_bytes_per_s":
                   device.interconnect, "platform": device.platform, "allocator_limit_bytes": int(limit),
                   "source": device.source},
        "parallelism": {"tp": req.tp, "pp": req.pp, "devices": req.tp * req.pp,
                        "stage_layers": [[s.layers.start, s.layers.stop] for s in weights.stages],
                        "q_heads_per_device": q_heads_per_device(config, req.tp), "kv_heads_per_device": kv_heads,
                        "kv_heads_replicated": kv_heads_replicated(config, req.tp),
                        "query_heads_padded": query_heads_padded(config, req.tp)},
        "weights": {"format": fmt.describe(), "head_dtype": head, "total_bytes": weights.total_bytes,
                    "per_device_bytes": weights.stages[worst].bytes,
                    "per_stage_device_bytes": [s.bytes for s in weights.stages],
                    "replicated_bytes_per_device": weights.stages[worst].replicated_bytes,
                    "by_kind_bytes": weights.by_kind},
        "kv_cache": {"dtype": kv_dtype, "bytes_per_token": config.kv_bytes_per_token(dtype_bytes(kv_dtype)),
                     "bytes_per_token_per_device": kv_per_token_dev, "block_size": req.block_size,
                     "bytes_per_block_per_device": kv_per_token_dev * req.block_size,
                     "budget_bytes_per_device": int(budget), "num_blocks": num_blocks,
                     "num_tokens": num_blocks * req.block_size, "allocated_bytes_per_device": kv_alloc,
                     "max_model_len": max_model_len, "context_len": context,
                     "bytes_per_sequence_at_context": blocks_per_seq * req.block_size
                     * config.kv_bytes_per_token(dtype_bytes(kv_dtype)),
                     "concurrent_sequences_at_context": fit_seqs,
                     "budget_below_one_sequence": forced},
        "activations": {"dtype": act, "estimate_bytes_per_device": act_bytes,
                        "step_tokens": req.max_num_batched_tokens,
                        "step_sampled_rows": min(req.max_num_batched_tokens, req.max_num_seqs)},
        "memory": {"used_bytes_per_device": used, "limit_bytes_per_device": int(limit),
                   "headroom_bytes_per_device": int(limit - used), "fits": used <= limit and fit_seqs >= 1},
        "roofline": {"ridge_flops_per_byte": ridge, "decode_context_len": context, "decode": decode,
                     "prefill": {"prompt_len": prompt_len, "chunk_tokens": chunk, **pre},
                     "decode_compute_bound_batch": roofline.compute_bound_batch(costs, ridge, context),
                     "decode_compute_bound_batch_short_context": roofline.compute_bound_batch(costs, ridge, 1)},
        "communication": {"allreduce_payload_bytes_per_token": allreduce,
                          "allreduce_traffic_bytes_per_token_per_device": ring * allreduce,
                          "allreduces_per_token": (2 * config.num_layers + (1 if req.tp > 1 and shard_count(
                              VOCAB, config, req.tp, req.pp) > 1 else 0)) if req.tp > 1 else 0,
                          "p2p_bytes_per_token": sum(c.p2p_bytes for c in costs)},
        "notes": notes,
    }


def _step_dict(s: roofline.StepEstimate, pp: int) -> dict:
    out = {"tokens": s.tokens, "flops_per_device": s.flops, "bytes_per_device": s.bytes,
           "intensity_flops_per_byte": s.intensity, "bound": s.bound, "step_s": s.step_s,
           "tokens_per_s": s.tokens / s.step_s, "comm_s": s.comm_s}
    if pp > 1:  # every stage busy with its own micro-batch (the engine's pipelined steps), no bubble
        out["tokens_per_s_pipelined"] = s.tokens / s.stage_s
    return out


def _notes(config: ModelConfig, req: PlanRequest, device: Accelerator, kv_dtype: str, forced: bool) -> list[str]:
    notes = []
    if kv_heads_replicated(config, req.tp):
        notes.append(f"{config.num_kv_heads} KV heads do not split {req.tp} ways: they are laid out over "
                     f"{kv_heads_per_device(config, req.tp) * req.tp} KV slots (heads replicated), with their k/v "
                     "projections and KV pages")
    if query_heads_padded(config, req.tp):
        notes.append(f"{config.num_heads} query heads do not split {req.tp} ways: {query_heads_padded(config, req.tp)}"
                     " zero heads pad them (computed, and stored in q / o)")
    if config.vocab_size % (req.tp * req.pp):
        notes.append(f"vocabulary {config.vocab_size} is padded to split {req.tp * req.pp} ways")
    if kv_dtype not in FLOAT_DTYPES:
        notes.append(f"KV dtype {kv_dtype}: the engine does not store KV in it yet (float32/bfloat16/float16)")
    if forced:
        notes.append("the KV budget is below one max_model_len sequence; the engine allocates one anyway and "
                     "may run out of memory")
    if device.platform == "cpu" and req.kv_cache_memory_gb is None and not req.num_kv_blocks:
        notes.append("CPU: the engine's KV budget is a fixed 2 GiB unless kv_cache_memory_gb is given")
    return notes
