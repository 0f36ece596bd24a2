"""Functional paged-KV block pool: pure bookkeeping of which physical KV blocks each sequence owns.

The state is immutable; every operation returns a new state (failed operations raise and leave the
caller's state untouched, so the scheduler can try an allocation and back off without undo logic).

Vocabulary
- A sequence's *block table* maps its logical block ``i`` (tokens ``i*bs .. i*bs+bs-1``) to a physical block.
- ``num_tokens`` of a sequence = token slots reserved for it; the table always has exactly
  ``ceil(num_tokens / block_size)`` blocks.
- Every physical block is in exactly one of three sets:
    used      ref count > 0 (in at least one table; > 1 when shared by a fork or a prefix-cache hit)
    cached    ref count 0 but holding a hashed full block: still reusable by a prefix lookup, and evictable
              in LRU order when the free list is empty
    free      ref count 0, no content worth keeping
- Automatic prefix caching (as in vLLM): a *full* block whose K/V has been computed is registered under the
  chained hash ``hash((parent_hash, tuple(block_tokens)))``, so equal hashes mean equal whole prefixes.
  Only full blocks are ever shared through the cache, and a full block is never written again, so cached
  content can't go stale. The one block that can be written while shared is the partially filled last block
  after ``fork``: writing to it triggers copy-on-write, reported as ``(src, dst)`` pairs the engine must copy
  on device *before* the step's K/V writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

_ROOT_HASH = 0x6A61_7869_6E66  # parent hash of a sequence's first block

_EMPTY: Mapping = MappingProxyType({})


def _empty() -> Mapping:
    return _EMPTY


class NoFreeBlocksError(RuntimeError):
    """Not enough free (or evictable) blocks for the requested operation; the state was not changed."""


@dataclass(frozen=True)
class SeqBlocks:
    blocks: tuple[int, ...]
    num_tokens: int  # token slots reserved
    hashes: tuple[int, ...] = ()  # chained hashes of the leading full blocks whose K/V is known computed


@dataclass(frozen=True)
class BlockPoolState:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    seqs: Mapping[int, SeqBlocks] = field(default_factory=_empty)
    ref_counts: Mapping[int, int] = field(default_factory=_empty)  # only blocks with ref count > 0
    free_blocks: tuple[int, ...] = ()  # allocation pops from the end (LIFO)
    # ref count 0 + hashed: evictable. Insertion order is LRU order (the first key is evicted first).
    cached: Mapping[int, None] = field(default_factory=_empty)
    block_to_hash: Mapping[int, int] = field(default_factory=_empty)  # registered blocks (used or cached)
    hash_to_block: Mapping[int, int] = field(default_factory=_empty)  # one physical block per hash
    hit_tokens: int = 0  # prefix-cache statistics, over allocate() calls
    queried_tokens: int = 0


def create(num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> BlockPoolState:
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    # Reversed so that the LIFO free list hands out block 0 first (readable tables in tests and logs).
    free_blocks = tuple(range(num_blocks - 1, -1, -1))
    return BlockPoolState(num_blocks, block_size, enable_prefix_caching, free_blocks=free_blocks)


class _Txn:
    """Mutable scratch copy of a state for the duration of one operation (copy-on-write per field)."""

    def __init__(self, state: BlockPoolState):
        self.state = state
        self._copied: dict[str, dict] = {}
        self._free: list[int] | None = None

    def m(self, name: str) -> dict:
        """Writable copy of one of the state's mappings (copied on first use)."""
        if name not in self._copied:
            self._copied[name] = dict(getattr(self.state, name))
        return self._copied[name]

    def r(self, name: str) -> Mapping:
        """Read view of one of the state's mappings: the working copy if there is one."""
        return self._copied[name] if name in self._copied else getattr(self.state, name)

    def free_list(self) -> list[int]:
        if self._free is None:
            self._free = list(self.state.free_blocks)
        return self._free

    def num_free(self) -> int:
        free = len(self._free) if self._free is not None else len(self.state.free_blocks)
        return free + len(self.r("cached"))

    def take_block(self) -> int:
        """A ref-count-0 block for new content: the free list first, else evict the LRU cached block."""
        free = self.free_list()
        if free:
            block = free.pop()
        else:
            cached = self.m("cached")
            if not cached:
                raise NoFreeBlocksError("no free or evictable KV blocks")
            block = next(iter(cached))  # least recently used
            del cached[block]
            del self.m("hash_to_block")[self.m("block_to_hash").pop(block)]
        self.m("ref_counts")[block] = 1
        return block

    def ref(self, block: int) -> None:
        refs = self.m("ref_counts")
        if block not in refs:  # a cache hit on an unreferenced block: it stops being evictable
            del self.m("cached")[block]
        refs[block] = refs.get(block, 0) + 1

    def unref(self, block: int) -> None:
        refs = self.m("ref_counts")
        refs[block] -= 1
        if refs[block] == 0:
            del refs[block]
            if block in self.r("block_to_hash"):
                self.m("cached")[block] = None  # most recently used: evicted last
            else:
                self.free_list().append(block)

    def build(self, **changes) -> BlockPoolState:
        for name, d in self._copied.items():
            changes[name] = MappingProxyType(d)
        if self._free is not None:
            changes["free_blocks"] = tuple(self._free)
        return dataclasses.replace(self.state, **changes)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _block_hash(parent: int, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


def _match_prefix(state: BlockPoolState, token_ids: Sequence[int], use_cache: bool = True
                  ) -> tuple[list[int], list[int]]:
    """Cached blocks (and their hashes) covering the longest cached full-block prefix of ``token_ids``,
    leaving at least the last token uncached so the model has a position to produce logits from."""
    if not (state.enable_prefix_caching and use_cache):
        return [], []
    bs = state.block_size
    blocks, hashes, parent = [], [], _ROOT_HASH
    for i in range((len(token_ids) - 1) // bs):
        h = _block_hash(parent, token_ids[i * bs:(i + 1) * bs])
        block = state.hash_to_block.get(h)
        if block is None:
            break
        blocks.append(block)
        hashes.append(h)
        parent = h
    return blocks, hashes


# ---------------------------------------------------------------------------------------------- queries

def num_cached_tokens(state: BlockPoolState, token_ids: Sequence[int], use_cache: bool = True) -> int:
    """Leading tokens of ``token_ids`` that ``allocate`` would serve from the prefix cache."""
    return len(_match_prefix(state, token_ids, use_cache)[0]) * state.block_size


def num_free_blocks(state: BlockPoolState) -> int:
    """Blocks available for new content: free + cached-evictable."""
    return len(state.free_blocks) + len(state.cached)


def _alloc_need(state: BlockPoolState, token_ids: Sequence[int], num_new_tokens: int | None, use_cache: bool):
    hit_blocks, hashes = _match_prefix(state, token_ids, use_cache)
    num_hit = len(hit_blocks) * state.block_size
    if num_new_tokens is None:
        num_new_tokens = len(token_ids) - num_hit
    new_blocks = _blocks_for(num_hit + num_new_tokens, state.block_size) - len(hit_blocks)
    # A hit on a cached (unreferenced) block takes it out of the evictable set.
    available = num_free_blocks(state) - sum(1 for b in hit_blocks if b in state.cached)
    return hit_blocks, hashes, num_hit, num_new_tokens, new_blocks, available


def can_allocate(state: BlockPoolState, token_ids: Sequence[int], num_new_tokens: int | None = None,
                 use_cache: bool = True) -> bool:
    *_, new_blocks, available = _alloc_need(state, token_ids, num_new_tokens, use_cache)
    return new_blocks <= available


def max_allocatable_tokens(state: BlockPoolState, token_ids: Sequence[int], use_cache: bool = True) -> int:
    """Most tokens past the cached prefix of ``token_ids`` that ``allocate`` could reserve right now."""
    hit_blocks, _, num_hit, _, _, available = _alloc_need(state, token_ids, 0, use_cache)
    return min(len(token_ids) - num_hit, available * state.block_size)


def _append_need(seqs: Mapping[int, SeqBlocks], ref_counts: Mapping[int, int], block_size: int,
                 seq_id: int, num_new_tokens: int) -> tuple[int, bool]:
    """(blocks to take, whether the last block must be copied first) to grow a sequence by num_new_tokens."""
    entry = seqs[seq_id]
    new_blocks = _blocks_for(entry.num_tokens + num_new_tokens, block_size) - len(entry.blocks)
    # Writing into a partially filled last block that another table also references -> copy-on-write.
    cow = (num_new_tokens > 0 and entry.num_tokens % block_size != 0
           and ref_counts[entry.blocks[-1]] > 1)
    return new_blocks + cow, cow


def can_append_slots(state: BlockPoolState, seq_id: int, num_new_tokens: int) -> bool:
    need, _ = _append_need(state.seqs, state.ref_counts, state.block_size, seq_id, num_new_tokens)
    return need <= num_free_blocks(state)


def block_table(state: BlockPoolState, seq_id: int) -> tuple[int, ...]:
    return state.seqs[seq_id].blocks


def num_seq_tokens(state: BlockPoolState, seq_id: int) -> int:
    """Token slots reserved for a sequence."""
    return state.seqs[seq_id].num_tokens


def metrics(state: BlockPoolState) -> dict[str, float]:
    used = len(state.ref_counts)
    alloc_slots = sum(len(e.blocks) for e in state.seqs.values()) * state.block_size
    used_slots = sum(e.num_tokens for e in state.seqs.values())
    return {
        "total_blocks": state.num_blocks,
        "used_blocks": used,
        "cached_blocks": len(state.cached),
        "free_blocks": len(state.free_blocks),
        "usage": used / state.num_blocks,  # fraction of blocks referenced by live sequences
        "prefix_cache_hit_rate": state.hit_tokens / state.queried_tokens if state.queried_tokens else 0.0,
        # Reserved-but-unwritten token slots (tails of last blocks) over all allocated slots of live sequences.
        "fragmentation": (alloc_slots - used_slots) / alloc_slots if alloc_slots else 0.0,
    }


# ------------------------------------------------------------------------------------------- operations

def allocate(state: BlockPoolState, seq_id: int, token_ids: Sequence[int],
             num_new_tokens: int | None = None, use_cache: bool = True) -> tuple[BlockPoolState, int]:
    """Give a new sequence its first blocks. Returns ``(state, num_cached)``.

    Leading full blocks of ``token_ids`` found in the prefix cache are shared (ref count +1) and their
    ``num_cached`` tokens need no compute; fresh blocks then cover ``num_new_tokens`` more tokens (default:
    the rest of ``token_ids``). ``token_ids`` may be longer than what is reserved (chunked prefill).
    ``use_cache=False`` skips the lookup (the sequence still registers its own full blocks for others).
    """
    if seq_id in state.seqs:
        raise ValueError(f"sequence {seq_id} already has blocks")
    hit_blocks, hashes, num_hit, num_new_tokens, new_blocks, available = _alloc_need(
        state, token_ids, num_new_tokens, use_cache)
    if num_new_tokens < 0 or num_hit + num_new_tokens > len(token_ids):
        raise ValueError(f"cannot reserve {num_new_tokens} tokens past {num_hit} cached of {len(token_ids)}")
    if new_blocks > available:
        raise NoFreeBlocksError(f"sequence {seq_id} needs {new_blocks} blocks, {available} available")
    txn = _Txn(state)
    for block in hit_blocks:
        txn.ref(block)
    blocks = hit_blocks + [txn.take_block() for _ in range(new_blocks)]
    txn.m("seqs")[seq_id] = SeqBlocks(tuple(blocks), num_hit + num_new_tokens, tuple(hashes))
    return txn.build(hit_tokens=state.hit_tokens + num_hit,
                     queried_tokens=state.queried_tokens + len(token_ids)), num_hit


def append_slots(state: BlockPoolState, seq_id: int, token_ids_so_far: Sequence[int] | None,
                 num_new_tokens: int) -> tuple[BlockPoolState, list[tuple[int, int]]]:
    """Reserve ``num_new_tokens`` more token slots for a sequence. Returns ``(state, copies)``.

    ``copies`` lists ``(src, dst)`` block copies (copy-on-write of a shared last block) to run on device
    before this step writes K/V. If ``token_ids_so_far`` is given, the already-reserved slots are taken as
    computed (the previous step ran) and newly full blocks are registered in the prefix cache.
    """
    if token_ids_so_far is not None:
        state = cache_full_blocks(state, seq_id, token_ids_so_far, state.seqs[seq_id].num_tokens)
    new_state, copies, done = append_slots_batch(state, [(seq_id, num_new_tokens)])
    if not done:
        need, _ = _append_need(state.seqs, state.ref_counts, state.block_size, seq_id, num_new_tokens)
        raise NoFreeBlocksError(f"sequence {seq_id} needs {need} blocks, {num_free_blocks(state)} available")
    return new_state, copies


def append_slots_batch(state: BlockPoolState, requests: Iterable[tuple[int, int]]
                       ) -> tuple[BlockPoolState, list[tuple[int, int]], int]:
    """``append_slots`` for many ``(seq_id, num_new_tokens)`` in one go (one state copy per step instead of one
    per sequence). Grows them in order and stops before the first that does not fit.
    Returns ``(state, copies, number of requests done)``."""
    txn = _Txn(state)
    bs = state.block_size
    copies: list[tuple[int, int]] = []
    seqs = txn.m("seqs")
    done = 0
    for seq_id, num_new_tokens in requests:
        if num_new_tokens < 0:
            raise ValueError("num_new_tokens must be >= 0")
        need, cow = _append_need(seqs, txn.r("ref_counts"), bs, seq_id, num_new_tokens)
        if need > txn.num_free():
            break
        entry = seqs[seq_id]
        blocks = entry.blocks
        if need:
            blocks = list(blocks)
            if cow:
                src, dst = blocks[-1], txn.take_block()
                txn.unref(src)  # still referenced by the other table(s): stays used
                blocks[-1] = dst
                copies.append((src, dst))
            blocks += [txn.take_block() for _ in range(need - cow)]
            blocks = tuple(blocks)
        seqs[seq_id] = SeqBlocks(blocks, entry.num_tokens + num_new_tokens, entry.hashes)
        done += 1
    return txn.build(), copies, done


def cache_full_blocks(state: BlockPoolState, seq_id: int, token_ids: Sequence[int],
                      num_computed_tokens: int) -> BlockPoolState:
    """Register in the prefix cache the sequence's full blocks whose K/V is computed (the first
    ``num_computed_tokens`` tokens, whose ids are ``token_ids[:num_computed_tokens]``)."""
    return cache_full_blocks_batch(state, [(seq_id, token_ids, num_computed_tokens)])


def cache_full_blocks_batch(state: BlockPoolState,
                            items: Iterable[tuple[int, Sequence[int], int]]) -> BlockPoolState:
    """``cache_full_blocks`` for many ``(seq_id, token_ids, num_computed_tokens)`` at once."""
    if not state.enable_prefix_caching:
        return state
    txn = _Txn(state)
    bs = state.block_size
    for seq_id, token_ids, num_computed_tokens in items:
        entry = txn.r("seqs")[seq_id]
        num_full = min(num_computed_tokens, entry.num_tokens, len(token_ids)) // bs
        if num_full <= len(entry.hashes):
            continue
        hashes = list(entry.hashes)
        hash_to_block, block_to_hash = txn.m("hash_to_block"), txn.m("block_to_hash")
        for i in range(len(hashes), num_full):
            h = _block_hash(hashes[-1] if hashes else _ROOT_HASH, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = entry.blocks[i]
            # If another block already holds this content (computed concurrently) keep that one as the
            # cache entry; this block stays unregistered and is simply freed with its sequence.
            if h not in hash_to_block and block not in block_to_hash:
                hash_to_block[h] = block
                block_to_hash[block] = h
        txn.m("seqs")[seq_id] = SeqBlocks(entry.blocks, entry.num_tokens, tuple(hashes))
    return txn.build()


def fork(state: BlockPoolState, parent_seq_id: int, child_seq_id: int) -> BlockPoolState:
    """The child shares all of the parent's blocks (ref counts +1); writes to the shared partial last
    block are copy-on-write (see ``append_slots``)."""
    if child_seq_id in state.seqs:
        raise ValueError(f"sequence {child_seq_id} already has blocks")
    parent = state.seqs[parent_seq_id]
    txn = _Txn(state)
    for block in parent.blocks:
        txn.ref(block)
    txn.m("seqs")[child_seq_id] = parent
    return txn.build()


def free(state: BlockPoolState, seq_id: int) -> BlockPoolState:
    """Drop a sequence's table. Blocks nobody references any more become cached-evictable if they hold a
    registered hash, else free."""
    txn = _Txn(state)
    entry = txn.m("seqs").pop(seq_id)
    # Tail first, so a prefix's tail blocks are evicted before its head blocks (heads are more shareable).
    for block in reversed(entry.blocks):
        txn.unref(block)
    return txn.build()


def reset_prefix_cache(state: BlockPoolState) -> BlockPoolState:
    """Forget all cached content: cached blocks become free; blocks in use just lose their hash."""
    free_blocks = state.free_blocks + tuple(state.cached)
    return dataclasses.replace(state, free_blocks=free_blocks, cached=_EMPTY, block_to_hash=_EMPTY,
                               hash_to_block=_EMPTY, hit_tokens=0, queried_tokens=0)
