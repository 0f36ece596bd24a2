"""Roofline of a decode step and of a prefill, per device, from the per-device shapes of the declared parameters.

What is counted (per device of the stage that takes longest):
  FLOPs   2 per multiply-add of every linear layer (at its per-device shape), the LM head only for the rows that
          sample (the engine computes logits only there), and attention: 2 * 2 * q_heads * head_dim per
          (query, key) pair (scores and the weighted sum of V). Norms, RoPE, SiLU and softmax are not counted.
  bytes   weights read once per step (the embedding table is gathered, not streamed), K/V of every context
          token read once and the new tokens' K/V written once, and activations: each linear reads its input
          and writes its output once at the activation dtype (logits in f32).
Time of a step = max(FLOPs / peak, bytes / bandwidth) per stage, plus tensor-parallel all-reduces and pipeline
point-to-point transfers at the link's one-way bandwidth (half the data sheet's both-ways figure); the
per-collective latency (microseconds each, 2 per layer) is not modelled, and at small batches it is what
limits TP decode in practice. A ring all-reduce of M bytes sends 2 (tp - 1) / tp * M per device.
"""
from __future__ import annotations

import dataclasses
import math

from jaxinfer.config import ModelConfig
from jaxinfer.params import VOCAB, Kind
from jaxinfer.planner.hardware import Accelerator
from jaxinfer.planner.weights import (WeightReport, device_shape, kv_heads_per_device, q_heads_per_device,
                                      shard_count, stage_specs)


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Per-token costs of one pipeline stage on one device."""
    num_layers: int
    streamed_bytes: int      # weights a step reads
    linear_flops: int        # per token through the stage's layers
    head_flops: int          # per sampled token (last stage only)
    attn_flops_per_ctx: int  # per token per context position
    kv_bytes: int            # K/V bytes per token held (and written) on this device
    act_bytes: int           # activation bytes per token through the layers
    head_act_bytes: int      # per sampled token: LM head input and f32 logits
    gather_bytes: int        # per token: the embedding row (first stage)
    allreduce_bytes: int     # per token: payload of the tensor-parallel all-reduces
    p2p_bytes: int           # per token: the residual stream sent to the next stage (0 on the last)


def stage_costs(config: ModelConfig, weights: WeightReport, *, tp: int, pp: int, act_bytes: int,
                kv_dtype_bytes: int, head_dtype_bytes: int) -> list[StageCost]:
    d = config.hidden_size
    hq, kvh = q_heads_per_device(config, tp), kv_heads_per_device(config, tp)
    out = []
    for index, specs in enumerate(stage_specs(config, pp)):
        linear_flops = act = 0
        head_flops = head_act = 0
        for spec in specs:
            if spec.kind not in (Kind.LINEAR, Kind.HEAD) or (spec.name == "lm_head" and index < pp - 1):
                continue  # norms, biases; the LM head runs once, after the last stage, each device its slice
            if spec.name == "embed":
                continue
            k, n = device_shape(spec.shape, spec.axes, config, tp, pp)
            if spec.kind == Kind.LINEAR:
                linear_flops += 2 * k * n
                act += (k + n) * act_bytes
            else:  # the LM head: f32 input and f32 logits
                head_flops += 2 * k * n
                head_act += (k + n) * 4
        layers = len(weights.stages[index].layers)
        vocab_split = shard_count(VOCAB, config, tp, pp) > 1
        allreduce = (2 * layers + (1 if index == 0 and vocab_split else 0)) * d * act_bytes if tp > 1 else 0
        out.append(StageCost(
            num_layers=layers, streamed_bytes=weights.stages[index].streamed_bytes, linear_flops=linear_flops,
            head_flops=head_flops, attn_flops_per_ctx=4 * layers * hq * config.head_dim,
            kv_bytes=config.kv_bytes_per_token(kv_dtype_bytes, num_layers=layers, num_kv_heads=kvh),
            act_bytes=act, head_act_bytes=head_act, gather_bytes=d * head_dtype_bytes if index == 0 else 0,
            allreduce_bytes=allreduce, p2p_bytes=d * act_bytes if index < pp - 1 else 0))
    return out


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """One step on the bottleneck stage (the one that takes longest), and the whole step's time."""
    tokens: int              # tokens the step processes (decode: the batch size; prefill: the prompt)
    flops: float             # on one device of the bottleneck stage
    bytes: float
    compute_s: float
    memory_s: float
    comm_s: float            # all-reduce + point-to-point, summed over stages
    step_s: float            # all stages in turn, plus communication
    stage_s: float           # the bottleneck stage alone (plus its all-reduces): the pipelined step time

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"


def _one_way(device: Accelerator) -> float | None:
    return device.interconnect / 2 if device.interconnect else None


def _combine(parts, device: Accelerator, peak: float, tp: int, tokens: int) -> StepEstimate:
    """parts: per stage (flops, bytes, allreduce payload, p2p payload) for the whole step."""
    link = _one_way(device)
    ring = 2 * (tp - 1) / tp if tp > 1 else 0.0
    stage_times, comm_total = [], 0.0
    for flops, nbytes, allreduce, p2p in parts:
        ar = ring * allreduce / link if link and allreduce else 0.0
        pt = p2p / link if link and p2p else 0.0
        stage_times.append((max(flops / peak, nbytes / device.bandwidth) + ar, flops, nbytes, ar + pt))
        comm_total += ar + pt
    worst = max(range(len(parts)), key=lambda i: stage_times[i][0])
    t, flops, nbytes, _ = stage_times[worst]
    step = sum(s[0] for s in stage_times) + sum(p2p / link for *_, p2p in parts if link and p2p)
    return StepEstimate(tokens, flops, nbytes, flops / peak, nbytes / device.bandwidth, comm_total, step, t)


def decode_step(costs: list[StageCost], device: Accelerator, peak: float, tp: int, batch: int,
                context: int) -> StepEstimate:
    """`batch` sequences each decode one token with `context` tokens of context (the new one included)."""
    parts = []
    for c in costs:
        per_token_flops = c.linear_flops + c.head_flops + c.attn_flops_per_ctx * context
        per_token_bytes = c.kv_bytes * (context + 1) + c.act_bytes + c.head_act_bytes + c.gather_bytes
        parts.append((batch * per_token_flops, c.streamed_bytes + batch * per_token_bytes,
                      batch * c.allreduce_bytes, batch * c.p2p_bytes))
    return _combine(parts, device, peak, tp, batch)


def prefill(costs: list[StageCost], device: Accelerator, peak: float, tp: int, prompt_len: int,
            chunk: int) -> StepEstimate:
    """One prompt of `prompt_len` tokens in chunks of `chunk` (the engine's max_num_batched_tokens): each chunk
    reads the weights again and attends to the whole context so far; the LM head runs for the last token only."""
    totals = [[0.0, 0.0, 0.0, 0.0] for _ in costs]
    for start in range(0, prompt_len, chunk):
        end = min(prompt_len, start + chunk)
        n, pairs = end - start, (end * (end + 1) - start * (start + 1)) // 2
        for t, c in zip(totals, costs):
            t[0] += n * c.linear_flops + pairs * c.attn_flops_per_ctx
            t[1] += c.streamed_bytes + n * (c.act_bytes + c.gather_bytes) + (n + end) * c.kv_bytes
            t[2] += n * c.allreduce_bytes
            t[3] += n * c.p2p_bytes
    for t, c in zip(totals, costs):
        t[0] += c.head_flops
        t[1] += c.head_act_bytes
    return _combine([tuple(t) for t in totals], device, peak, tp, prompt_len)


def compute_bound_batch(costs: list[StageCost], ridge: float, context: int) -> int | None:
    """Smallest decode batch whose arithmetic intensity reaches the ridge point on every stage:
    AI(B) = B f / (W + B b) >= ridge  <=>  B >= ridge W / (f - ridge b). None when f <= ridge b: at this context
    the K/V each token reads grows as fast as its FLOPs, and decode never becomes compute-bound."""
    worst = 0
    for c in costs:
        f = c.linear_flops + c.head_flops + c.attn_flops_per_ctx * context
        b = c.kv_bytes * (context + 1) + c.act_bytes + c.head_act_bytes + c.gather_bytes
        if f <= ridge * b:
            return None
        worst = max(worst, math.ceil(ridge * c.streamed_bytes / (f - ridge * b)))
    return worst
