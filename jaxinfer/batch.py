"""The flat, ragged step batch (see docs/ARCHITECTURE.md, "Step batch") and its host-side builder."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct


@struct.dataclass
class StepBatch:
    token_ids: jax.Array       # [T]
    positions: jax.Array       # [T]
    seq_ids: jax.Array         # [T]
    slot_mapping: jax.Array    # [T]
    query_start: jax.Array     # [S+1]
    kv_lens: jax.Array         # [S]
    block_tables: jax.Array    # [S, MB]
    logits_indices: jax.Array  # [S]
    num_seqs: jax.Array        # [1]
    # Async scheduling: row of the previous step's sampled ids that holds this token (its id is not on the host
    # yet: the forward reads it on device), or -1 = the id in token_ids.
    prev_sample_rows: jax.Array  # [T]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


@dataclasses.dataclass
class SeqChunk:
    """One sequence's share of a step: tokens [start, start + len(token_ids)) of its context."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    pending_row: int = -1  # >= 0: the last token is still on device, in this row of the previous step's samples


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def build_step_batch(chunks: list[SeqChunk], *, num_tokens: int, num_seqs: int, max_blocks: int,
                     block_size: int, num_blocks: int) -> StepBatch:
    """Pack sequence chunks into padded numpy arrays of static shape (T=num_tokens, S=num_seqs)."""
    total = sum(len(c.token_ids) for c in chunks)
    assert total <= num_tokens and len(chunks) <= num_seqs, (total, num_tokens, len(chunks), num_seqs)
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    seq_ids = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, num_blocks * block_size, np.int32)  # out of range: write dropped
    query_start = np.full(num_seqs + 1, total, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    block_tables = np.zeros((num_seqs, max_blocks), np.int32)
    logits_indices = np.zeros(num_seqs, np.int32)
    prev_sample_rows = np.full(num_tokens, -1, np.int32)
    offset = 0
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        pos = np.arange(c.start, c.start + n, dtype=np.int32)
        table = np.asarray(c.block_table, np.int32)
        sl = slice(offset, offset + n)
        token_ids[sl] = c.token_ids
        positions[sl] = pos
        seq_ids[sl] = s
        slot_mapping[sl] = table[pos // block_size] * block_size + pos % block_size
        query_start[s] = offset
        kv_lens[s] = c.start + n
        block_tables[s, :len(table)] = table
        logits_indices[s] = offset + n - 1
        prev_sample_rows[offset + n - 1] = c.pending_row
        offset += n
    return StepBatch(token_ids=token_ids, positions=positions, seq_ids=seq_ids, slot_mapping=slot_mapping,
                     query_start=query_start, kv_lens=kv_lens, block_tables=block_tables,
                     logits_indices=logits_indices, num_seqs=np.array([len(chunks)], np.int32),
                     prev_sample_rows=prev_sample_rows)
