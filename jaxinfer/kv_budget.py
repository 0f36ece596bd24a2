"""How many KV blocks the engine allocates: one formula, called by the engine core (engine_core.py) and the planner
(jaxinfer.planner), so a plan's KV figures are the engine's.

The budget is, in order: `kv_cache_memory_gb` when given (GiB); on a device whose allocator reports a limit
(GPU/TPU: `memory_stats()["bytes_limit"]`, which JAX sets to XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default, of
the device's memory) that limit times `kv_cache_memory_fraction` minus what is already in use (the weights, which
are loaded first); otherwise (CPU: no limit reported) a fixed 2 GiB, split among the devices a model spans (virtual
CPU devices share the host's memory). With tensor / pipeline parallelism every figure is per device, and one block
costs each device the KV of its own layers and KV heads (`ModelConfig.kv_bytes_per_token(num_layers=,
num_kv_heads=)`). The pool always holds at least one
max_model_len sequence, even when the budget is smaller (the engine then relies on the allocator's slack).
"""
from __future__ import annotations

import math
from typing import Mapping

CPU_DEFAULT_KV_BYTES = 2 * 2**30


def kv_budget_bytes(kv_cache_memory_gb: float | None, memory_fraction: float,
                    memory_stats: Mapping[str, int] | None, num_devices: int = 1) -> float:
    """Bytes of one device's memory the KV pages may take (see the module docstring); `num_devices`: how many
    devices the model spans."""
    if kv_cache_memory_gb is not None:
        return kv_cache_memory_gb * 2**30
    stats = memory_stats or {}
    if "bytes_limit" in stats:  # GPU/TPU: a fraction of what the weights leave free
        return stats["bytes_limit"] * memory_fraction - stats.get("bytes_in_use", 0)
    return CPU_DEFAULT_KV_BYTES / num_devices


def num_kv_blocks(budget_bytes: float, bytes_per_block: int, max_model_len: int, block_size: int) -> int:
    """Blocks that fit the budget, and never fewer than one max_model_len sequence needs."""
    return max(int(budget_bytes // bytes_per_block), math.ceil(max_model_len / block_size))


def resolve_max_model_len(max_position_embeddings: int, requested: int | None) -> int:
    """The engine's context limit: what was asked for (default 2048), never past the model's own."""
    return min(requested or min(max_position_embeddings, 2048), max_position_embeddings)
