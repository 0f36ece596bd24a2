"""Functional block pool: targeted cases + a hypothesis state machine that checks the bookkeeping invariants
and, through a simulated device KV cache, that every table really reads back its own tokens (prefix hits,
fork sharing and copy-on-write included)."""

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxinfer import block_pool as bp


def check_invariants(state: bp.BlockPoolState) -> None:
    refs = Counter(b for e in state.seqs.values() for b in e.blocks)
    assert dict(refs) == dict(state.ref_counts), "ref counts != number of tables holding each block"
    for e in state.seqs.values():
        assert len(set(e.blocks)) == len(e.blocks), "a table holds a block twice"
        assert len(e.blocks) == -(-e.num_tokens // state.block_size)
        assert len(e.hashes) <= e.num_tokens // state.block_size
    used, cached, free = set(state.ref_counts), set(state.cached), set(state.free_blocks)
    assert len(free) == len(state.free_blocks), "free list has duplicates"
    assert not (used & cached) and not (used & free) and not (cached & free)
    assert used | cached | free == set(range(state.num_blocks)), "free + cached + used != total"
    assert cached <= set(state.block_to_hash), "an evictable block without a hash"
    assert not (free & set(state.block_to_hash)), "a free block still registered"
    assert {h: b for b, h in state.block_to_hash.items()} == dict(state.hash_to_block)
    m = bp.metrics(state)
    assert m["used_blocks"] + m["cached_blocks"] + m["free_blocks"] == m["total_blocks"]
    assert bp.num_free_blocks(state) == len(free) + len(cached)


def test_allocate_append_free_roundtrip():
    s = bp.create(num_blocks=8, block_size=4)
    s, hit = bp.allocate(s, 1, list(range(10)))
    assert hit == 0 and len(bp.block_table(s, 1)) == 3
    s, copies = bp.append_slots(s, 1, None, 2)  # 12 tokens: still 3 blocks
    assert copies == [] and len(bp.block_table(s, 1)) == 3
    s, _ = bp.append_slots(s, 1, None, 1)
    assert len(bp.block_table(s, 1)) == 4
    check_invariants(s)
    s = bp.free(s, 1)
    check_invariants(s)
    assert bp.num_free_blocks(s) == 8 and not s.ref_counts


def test_prefix_hit_reuses_full_blocks_and_leaves_last_token():
    s = bp.create(num_blocks=16, block_size=4)
    prompt = list(range(12))  # exactly 3 full blocks
    s, _ = bp.allocate(s, 1, prompt)
    s = bp.cache_full_blocks(s, 1, prompt, 12)
    # Same prompt: only 2 blocks are hits — the last block is recomputed so there are logits to sample.
    assert bp.num_cached_tokens(s, prompt) == 8
    s, hit = bp.allocate(s, 2, prompt)
    assert hit == 8 and bp.block_table(s, 2)[:2] == bp.block_table(s, 1)[:2]
    assert bp.block_table(s, 2)[2] != bp.block_table(s, 1)[2]
    # Diverging inside block 1: only block 0 is a hit.
    other = prompt[:5] + [99] * 7
    assert bp.num_cached_tokens(s, other) == 4
    s = bp.free(bp.free(s, 1), 2)
    check_invariants(s)
    assert len(s.cached) == 3  # freed hashed blocks stay reusable
    s, hit = bp.allocate(s, 3, prompt + [7])
    assert hit == 12
    assert bp.metrics(s)["prefix_cache_hit_rate"] == pytest.approx((8 + 12) / (12 + 12 + 13))


def test_lookup_skipped_for_one_sequence():
    """use_cache=False (a request that wants prompt log-probs) gets fresh blocks for a cached prompt; the cached
    blocks stay reusable for later sequences."""
    s = bp.create(num_blocks=8, block_size=4)
    prompt = list(range(9))
    s, _ = bp.allocate(s, 1, prompt)
    s = bp.cache_full_blocks(s, 1, prompt, 9)
    s, hit = bp.allocate(s, 2, prompt, use_cache=False)
    assert hit == 0 and not set(bp.block_table(s, 1)) & set(bp.block_table(s, 2))
    s = bp.free(bp.free(s, 1), 2)
    assert bp.num_cached_tokens(s, prompt) == 8 and bp.num_free_blocks(s) == 8


def test_prefix_caching_off():
    s = bp.create(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s, _ = bp.allocate(s, 1, list(range(9)))
    s = bp.cache_full_blocks(s, 1, list(range(9)), 9)
    assert bp.num_cached_tokens(s, list(range(9))) == 0
    s = bp.free(s, 1)
    assert not s.cached and len(s.free_blocks) == 8


def test_fork_shares_and_copy_on_write():
    s = bp.create(num_blocks=8, block_size=4)
    s, _ = bp.allocate(s, 1, list(range(6)))  # blocks: [full, half]
    s = bp.fork(s, 1, 2)
    t1 = bp.block_table(s, 1)
    assert bp.block_table(s, 2) == t1 and all(s.ref_counts[b] == 2 for b in t1)
    s, copies = bp.append_slots(s, 2, None, 1)  # writes into the shared half block
    assert copies == [(t1[1], bp.block_table(s, 2)[1])] and bp.block_table(s, 2)[0] == t1[0]
    s, copies = bp.append_slots(s, 1, None, 1)  # now sole owner of its half block: no copy
    assert copies == [] and bp.block_table(s, 1) == t1
    check_invariants(s)


def test_failure_raises_and_leaves_state():
    s = bp.create(num_blocks=2, block_size=4)
    s, _ = bp.allocate(s, 1, list(range(8)))
    assert not bp.can_allocate(s, [1])
    with pytest.raises(bp.NoFreeBlocksError):
        bp.allocate(s, 2, [1])
    assert not bp.can_append_slots(s, 1, 1)
    with pytest.raises(bp.NoFreeBlocksError):
        bp.append_slots(s, 1, None, 1)
    assert bp.num_seq_tokens(s, 1) == 8 and 2 not in s.seqs
    check_invariants(s)


def test_lru_eviction_order():
    s = bp.create(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    s, _ = bp.allocate(s, 1, a)
    s = bp.free(bp.cache_full_blocks(s, 1, a, 5), 1)  # a's 2 full blocks cached
    s, _ = bp.allocate(s, 2, b)
    s = bp.free(bp.cache_full_blocks(s, 2, b, 5), 2)  # b's cached later
    assert len(s.cached) == 4
    s, _ = bp.allocate(s, 3, [0] * 7)  # 4 blocks: the 2 free ones, then evicts a's (least recently used)
    assert bp.num_cached_tokens(s, a) == 0 and bp.num_cached_tokens(s, b) == 4
    check_invariants(s)


def test_cached_hit_not_double_counted_as_free():
    s = bp.create(num_blocks=3, block_size=2)
    s, _ = bp.allocate(s, 1, [1, 2, 3, 4, 5])
    s = bp.free(bp.cache_full_blocks(s, 1, [1, 2, 3, 4, 5], 5), 1)
    # 2 cached + 1 free; hitting both cached blocks leaves one block for new tokens.
    assert bp.can_allocate(s, [1, 2, 3, 4, 5, 6])
    assert not bp.can_allocate(s, [1, 2, 3, 4, 5, 6, 7, 8])
    assert bp.max_allocatable_tokens(s, [1, 2, 3, 4, 5, 6, 7, 8]) == 2


def test_operations_are_pure():
    s0 = bp.create(num_blocks=4, block_size=2)
    s1, _ = bp.allocate(s0, 1, [1, 2, 3])
    s2 = bp.fork(s1, 1, 2)
    s3, copies = bp.append_slots(s2, 2, None, 1)
    s4 = bp.free(s3, 1)
    assert not s0.seqs and len(s0.free_blocks) == 4
    assert set(s1.seqs) == {1} and set(s2.seqs) == {1, 2} and copies
    assert s2.ref_counts[bp.block_table(s2, 1)[1]] == 2 and bp.block_table(s2, 2) == bp.block_table(s1, 1)
    assert set(s4.seqs) == {2}
    for s in (s0, s1, s2, s3, s4):
        check_invariants(s)


def test_batch_ops_stop_at_first_that_does_not_fit():
    s = bp.create(num_blocks=4, block_size=2)
    for i in range(3):
        s, _ = bp.allocate(s, i, [i, i])  # 3 full blocks
    s, copies, done = bp.append_slots_batch(s, [(0, 1), (1, 1), (2, 1)])
    assert done == 1 and copies == [] and bp.num_seq_tokens(s, 0) == 3 and bp.num_seq_tokens(s, 1) == 2
    s = bp.cache_full_blocks_batch(s, [(1, [1, 1], 2), (2, [2, 2, 9], 2)])
    assert len(s.hash_to_block) == 2
    check_invariants(s)


def test_reset_prefix_cache():
    s = bp.create(num_blocks=6, block_size=2)
    s, _ = bp.allocate(s, 1, [1, 2, 3, 4, 5])
    s = bp.cache_full_blocks(s, 1, [1, 2, 3, 4, 5], 5)
    s, _ = bp.allocate(s, 2, [7, 7, 7])
    s = bp.free(bp.cache_full_blocks(s, 2, [7, 7, 7], 3), 2)
    assert len(s.cached) == 1
    s = bp.reset_prefix_cache(s)
    assert bp.num_cached_tokens(s, [1, 2, 3, 4, 5]) == 0 and not s.cached
    check_invariants(s)
    s = bp.free(s, 1)
    assert len(s.free_blocks) == 6 and not s.cached


# ------------------------------------------------------------------------------------- state machine

BS = 3
NUM_BLOCKS = 12
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # tiny alphabet: many shared prefixes


class PoolMachine(RuleBasedStateMachine):
    """Each live sequence has known tokens; the first ``num_tokens`` slots are written on the simulated device
    (``kv[block][offset] = token``) right after they are reserved, as the engine would."""

    def __init__(self):
        super().__init__()
        self.state = bp.create(NUM_BLOCKS, BS)
        self.tokens: dict[int, list[int]] = {}
        self.kv = [[None] * BS for _ in range(NUM_BLOCKS)]
        self.next_id = 0

    def _write(self, seq_id, start, end):
        table = bp.block_table(self.state, seq_id)
        for pos in range(start, end):
            self.kv[table[pos // BS]][pos % BS] = self.tokens[seq_id][pos]

    @rule(toks=tokens_st, frac=st.floats(0, 1), use_cache=st.booleans())
    def allocate(self, toks, frac, use_cache):
        seq_id = self.next_id
        self.next_id += 1
        hit = bp.num_cached_tokens(self.state, toks, use_cache)
        assert use_cache or hit == 0
        n = round((len(toks) - hit) * frac)
        ok = bp.can_allocate(self.state, toks, n, use_cache)
        try:
            new, got = bp.allocate(self.state, seq_id, toks, n, use_cache)
        except bp.NoFreeBlocksError:
            assert not ok
            return
        assert ok and got == hit
        self.state, self.tokens[seq_id] = new, list(toks)
        # A prefix hit must point at blocks that really hold these tokens.
        table = bp.block_table(new, seq_id)
        for pos in range(hit):
            assert self.kv[table[pos // BS]][pos % BS] == toks[pos]
        self._write(seq_id, hit, hit + n)
        self.state = bp.cache_full_blocks(self.state, seq_id, toks, hit + n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), k=st.integers(1, 5), extra=st.lists(st.integers(0, 2), max_size=5))
    def append(self, data, k, extra):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.tokens[seq_id] += extra  # newly generated tokens become known
        have = bp.num_seq_tokens(self.state, seq_id)
        k = min(k, len(self.tokens[seq_id]) - have)
        if k <= 0:
            return
        ok = bp.can_append_slots(self.state, seq_id, k)
        try:
            new, copies = bp.append_slots(self.state, seq_id, self.tokens[seq_id], k)
        except bp.NoFreeBlocksError:
            assert not ok
            return
        assert ok
        self.state = new
        for src, dst in copies:  # the engine copies before writing
            assert new.ref_counts[src] >= 1 and new.ref_counts[dst] == 1
            self.kv[dst] = list(self.kv[src])
        self._write(seq_id, have, have + k)
        self.state = bp.cache_full_blocks(self.state, seq_id, self.tokens[seq_id], have + k)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.next_id
        self.next_id += 1
        self.state = bp.fork(self.state, parent, child)
        self.tokens[child] = self.tokens[parent][: bp.num_seq_tokens(self.state, parent)]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.state = bp.free(self.state, seq_id)
        del self.tokens[seq_id]

    @invariant()
    def bookkeeping(self):
        check_invariants(self.state)

    @invariant()
    def tables_read_back_their_tokens(self):
        for seq_id, toks in self.tokens.items():
            table = bp.block_table(self.state, seq_id)
            for pos in range(bp.num_seq_tokens(self.state, seq_id)):
                assert self.kv[table[pos // BS]][pos % BS] == toks[pos], (seq_id, pos)

    def teardown(self):
        # Whatever the order, ending every sequence returns the pool to full: all free or cached, no refs.
        for seq_id in list(self.tokens)[::-1]:
            self.state = bp.free(self.state, seq_id)
        check_invariants(self.state)
        assert not self.state.ref_counts and not self.state.seqs
        assert bp.num_free_blocks(self.state) == NUM_BLOCKS


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
