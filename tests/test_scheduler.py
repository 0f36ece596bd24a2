"""Scheduler simulations against a fake model: a simulated paged KV cache checks that every scheduled sequence
would attend to exactly its own tokens (block tables, prefix hits, forks, copy-on-write, preemption)."""

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxinfer import block_pool as bp
from jaxinfer.scheduler import Scheduler, SchedulerConfig, SchedulerError
from jaxinfer.sequence import PENDING_TOKEN, Sequence, SequenceStatus


class FakeEngine:
    """Drives a Scheduler like LLMEngine does, with random "sampled" tokens, checking contracts every step.

    async_steps: like the engine's async scheduling, a step's tokens reach the scheduler as PENDING_TOKEN and
    their real ids only after the next step is scheduled; the simulated device reads them from that step's
    samples, as the real one does."""

    def __init__(self, seed=0, async_steps=False, **cfg):
        self.async_steps = async_steps
        self.in_flight: dict[int, int] = {}  # seq_id -> token sampled by the previous step, not yet resolved
        self.cfg = SchedulerConfig(**cfg)
        self.sched = Scheduler(self.cfg)
        self.rng = random.Random(seed)
        self.kv: dict[int, list] = {}  # physical block -> token written in each slot
        self.want: dict[int, int] = {}  # seq_id -> number of tokens it must generate
        self.seqs: dict[int, Sequence] = {}
        self.finished: list[Sequence] = []
        self.steps: list = []  # (SchedulerOutput, running ids before the step)
        self.next_id = 0

    def add(self, request_id, prompt, max_tokens, n=1):
        seqs = []
        for _ in range(n):
            seq = Sequence(self.next_id, request_id, list(prompt), group_id=request_id if n > 1 else None,
                           max_output_tokens=max_tokens)
            self.next_id += 1
            self.want[seq.seq_id] = max_tokens
            self.seqs[seq.seq_id] = seq
            self.sched.add(seq)
            seqs.append(seq)
        return seqs

    def step(self):
        sched, cfg = self.sched, self.cfg
        running_before = list(sched.running)
        decoding_before = [s for s in running_before if s.num_tokens - s.num_computed_tokens == 1
                           and not self._final_token_in_flight(s)]
        out = sched.schedule()
        self.steps.append((out, {s.seq_id for s in running_before}))
        # Budgets.
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        # (async: a sequence whose final token is in flight has given its seat up already)
        assert sum(not self._final_token_in_flight(s) for s in sched.running) <= cfg.max_num_seqs
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        # Decodes first: no running decode is left out (unless preempted), and they precede prefill chunks.
        ids = {s.seq.seq_id for s in out.scheduled} | {s.seq_id for s in out.preempted}
        assert all(s.seq_id in ids for s in decoding_before)
        kinds = [s.num_new_tokens == 1 and s.seq in decoding_before for s in out.scheduled]
        assert kinds == sorted(kinds, reverse=True)
        if not cfg.enable_chunked_prefill:
            assert all(s.start + s.num_new_tokens == s.seq.num_tokens or s.seq.group_id is not None
                       for s in out.scheduled)
        if cfg.policy == "static" and running_before:
            assert all(s.seq in running_before or s.start > 0 for s in out.scheduled)
            assert {s.seq_id for s in sched.running} <= {s.seq_id for s in running_before} | {
                s.seq_id for s in self.seqs.values() if s.group_id is not None}
        # Simulated device: copies first, then every token's K/V written, then each sequence's reads.
        for src, dst in out.blocks_to_copy:
            self.kv[dst] = list(self.kv[src])
        bs = cfg.block_size
        for s in out.scheduled:
            assert s.start == s.seq.num_computed_tokens and s.num_new_tokens >= 1
            assert s.samples == (s.start + s.num_new_tokens == s.seq.num_tokens)
            assert len(s.block_table) * bs >= s.start + s.num_new_tokens
            toks = self._device_view(s.seq)
            for pos in range(s.start, s.start + s.num_new_tokens):
                self.kv.setdefault(s.block_table[pos // bs], [None] * bs)[pos % bs] = toks[pos]
        for s in out.scheduled:
            toks = self._device_view(s.seq)
            seen = [self.kv[s.block_table[p // bs]][p % bs] for p in range(s.start + s.num_new_tokens)]
            assert seen == toks[: s.start + s.num_new_tokens], f"{s.seq} reads wrong K/V"
        previous, self.in_flight = self.in_flight, {}
        self._receive(previous)  # async: the previous step's tokens arrive while this one "runs"
        sampled = {s.seq.seq_id: self.rng.randrange(1000) for s in out.scheduled if s.samples}
        if self.async_steps:
            sched.on_step_done(out, dict.fromkeys(sampled, PENDING_TOKEN))
            self.in_flight = sampled
        else:
            sched.on_step_done(out, sampled)
            for seq_id in sampled:
                self._maybe_finish(self.seqs[seq_id])
        return out

    def _device_view(self, seq):
        """The tokens the device computes on: a pending last token is read from the previous step's samples."""
        toks = seq.all_token_ids
        if toks[-1] == PENDING_TOKEN:
            toks[-1] = self.in_flight[seq.seq_id]
        assert PENDING_TOKEN not in toks
        return toks

    def _receive(self, tokens):
        for seq_id, token in tokens.items():
            seq = self.seqs[seq_id]
            if not seq.is_finished:
                seq.resolve_pending_token(token)
                self._maybe_finish(seq)

    def _maybe_finish(self, seq):
        if len(seq.output_token_ids) >= self.want[seq.seq_id] or seq.num_tokens >= self.cfg.max_model_len:
            self.sched.finish(seq.seq_id, SequenceStatus.FINISHED_LENGTH_CAPPED)
            self.finished.append(seq)

    def _final_token_in_flight(self, seq):
        return seq.seq_id in self.in_flight and (len(seq.output_token_ids) >= self.want[seq.seq_id]
                                                 or seq.num_tokens >= self.cfg.max_model_len)

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")

    def assert_pool_full(self):
        pool = self.sched.pool
        assert not pool.seqs and not pool.ref_counts
        assert bp.num_free_blocks(pool) == self.cfg.num_blocks


@pytest.mark.parametrize("async_steps", [False, True])
def test_single_request_tokens_and_chunked_prefill(async_steps):
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=128,
                     async_steps=async_steps)
    (seq,) = eng.add("r", range(40), max_tokens=5)
    eng.run()
    assert len(seq.output_token_ids) == 5 and seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    chunks = [s.num_new_tokens for out, _ in eng.steps for s in out.scheduled]
    # 40-token prompt over 3 steps, then 4 decodes; async scheduling adds no row for the token after the last
    assert chunks == [16, 16, 8, 1, 1, 1, 1]
    eng.assert_pool_full()


def test_no_chunking_prefills_in_one_piece():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=48, max_num_seqs=4, max_model_len=48,
                     enable_chunked_prefill=False)
    eng.add("a", range(40), 2)
    eng.add("b", range(100, 130), 2)  # does not fit next to a's prompt: waits a step, runs with a's decode
    eng.run()
    first = [(s.seq.request_id, s.num_new_tokens) for s in eng.steps[0][0].scheduled]
    second = [(s.seq.request_id, s.num_new_tokens) for s in eng.steps[1][0].scheduled]
    assert first == [("a", 40)] and second == [("a", 1), ("b", 30)]
    with pytest.raises(ValueError):
        SchedulerConfig(num_blocks=64, max_model_len=128, max_num_batched_tokens=64, enable_chunked_prefill=False)


@pytest.mark.parametrize("async_steps", [False, True])
def test_finished_slot_refilled_next_step(async_steps):
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                     async_steps=async_steps)
    a, = eng.add("a", range(5), 2)
    b, = eng.add("b", range(10, 15), 6)
    c, = eng.add("c", range(20, 25), 2)
    eng.step()  # prefill a, b (a samples its 1st token)
    assert eng.sched.num_running == 2 and eng.sched.num_waiting == 1
    eng.step()  # a samples its 2nd (last) token; async: still on the device
    assert a.is_finished != async_steps
    out = eng.step()  # async: a's seat is free although its token arrives only now
    assert [s.seq for s in out.scheduled] == [b, c] and out.scheduled[1].start == 0
    assert a.is_finished
    eng.run()
    eng.assert_pool_full()


def test_static_policy_waits_for_whole_batch():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                     policy="static")
    eng.add("a", range(5), 1)
    eng.add("b", range(10, 15), 6)
    c, = eng.add("c", range(20, 25), 1)
    eng.step()
    for _ in range(5):  # a finished at once, but c may not start until b is done
        eng.step()
        assert c.status == SequenceStatus.WAITING
    eng.run()
    assert c.is_finished
    eng.assert_pool_full()


def test_preemption_under_tiny_pool_completes_everything():
    eng = FakeEngine(seed=1, num_blocks=10, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                     max_model_len=40)
    reqs = [eng.add(f"r{i}", [i] * 6, max_tokens=20)[0] for i in range(6)]
    eng.run()
    assert sum(len(out.preempted) for out, _ in eng.steps) > 0
    assert eng.sched.metrics()["num_preemptions"] > 0
    assert all(len(s.output_token_ids) == 20 and s.is_finished for s in reqs)
    eng.assert_pool_full()


def test_preempted_resumes_first_and_keeps_output():
    eng = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=24)
    a, = eng.add("a", range(4), 12)
    b, = eng.add("b", range(10, 14), 12)
    c, = eng.add("c", range(20, 24), 12)
    while not any(out.preempted for out, _ in eng.steps):
        eng.step()
    victim = eng.steps[-1][0].preempted[0]
    assert victim is c  # most recently admitted
    assert victim.output_token_ids and victim.num_computed_tokens == 0
    assert eng.sched.waiting[0] is victim
    kept = list(victim.output_token_ids)
    eng.run()
    assert victim.output_token_ids[: len(kept)] == kept and len(victim.output_token_ids) == 12
    eng.assert_pool_full()


def test_recompute_after_preemption_hits_prefix_cache():
    eng = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32)
    eng.add("a", range(10), 10)
    b, = eng.add("b", range(100, 110), 20)
    while not any(out.preempted for out, _ in eng.steps):
        eng.step()
    assert b.num_preemptions == 1 and b.num_computed_tokens == 0
    eng.run()
    assert b.num_cached_tokens > 0  # its full blocks stayed cached and were reused on re-admission
    assert len(b.output_token_ids) == 20
    eng.assert_pool_full()


def test_prefix_hit_shares_blocks():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    shared = list(range(100, 113))  # 13 tokens: 3 full blocks
    a, = eng.add("a", shared + [1, 2], 8)
    eng.step()
    b, = eng.add("b", shared + [3, 4, 5], 8)
    out = eng.step()
    sb = next(s for s in out.scheduled if s.seq is b)
    assert sb.start == 12 and b.num_cached_tokens == 12  # 3 full blocks not recomputed
    sa = bp.block_table(eng.sched.pool, a.seq_id)
    assert sb.block_table[:3] == list(sa[:3])
    assert eng.sched.metrics()["prefix_cache_hit_rate"] > 0
    eng.run()
    eng.assert_pool_full()
    # Finished sequences leave their full blocks cached: a third request reuses them.
    assert eng.sched.pool.cached


def test_prefix_caching_off():
    eng = FakeEngine(num_blocks=64, block_size=4, max_model_len=64, max_num_batched_tokens=64,
                     enable_prefix_caching=False)
    eng.add("a", range(13), 2)
    eng.run()
    b, = eng.add("b", range(13), 2)
    assert eng.step().scheduled[0].start == 0
    eng.run()
    eng.assert_pool_full()
    assert not eng.sched.pool.cached


def test_n_siblings_share_prompt_blocks_then_copy_on_write():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    sibs = eng.add("g", range(10), max_tokens=4, n=3)
    out = eng.step()  # leader prefills 9 of 10 tokens
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(sibs[0], 9, False)]
    assert eng.sched.num_running == 3  # forked after the step
    tables = [bp.block_table(eng.sched.pool, s.seq_id) for s in sibs]
    assert tables[0] == tables[1] == tables[2]
    out = eng.step()  # all three compute the last prompt token, each sampling its own first token
    assert [(s.start, s.num_new_tokens, s.samples) for s in out.scheduled] == [(9, 1, True)] * 3
    assert len(out.blocks_to_copy) == 2  # the shared half-full block: 2 copies, the last writer keeps it
    tables = [s.block_table for s in out.scheduled]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2] and len({t[2] for t in tables}) == 3
    eng.run()
    assert all(len(s.output_token_ids) == 4 for s in sibs)
    eng.assert_pool_full()


def test_abort_frees_at_once():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    keep, = eng.add("keep", range(7), 5)
    eng.step()
    free_before = bp.num_free_blocks(eng.sched.pool)
    sibs = eng.add("gone", range(20, 30), 5, n=2)
    eng.step()
    eng.step()
    assert bp.num_free_blocks(eng.sched.pool) < free_before
    aborted = eng.sched.abort("gone")
    assert set(aborted) == set(sibs) and all(s.status == SequenceStatus.FINISHED_ABORTED for s in sibs)
    assert bp.num_free_blocks(eng.sched.pool) == 64 - len(bp.block_table(eng.sched.pool, keep.seq_id))
    w, = eng.add("waiting", range(5), 3)
    eng.sched.abort("waiting")
    assert w.is_finished and eng.sched.num_waiting == 0
    eng.run()
    eng.assert_pool_full()


def test_config_guards():
    with pytest.raises(ValueError):  # one max_model_len sequence must fit alone
        SchedulerConfig(num_blocks=3, block_size=4, max_model_len=16)
    with pytest.raises(ValueError):
        SchedulerConfig(num_blocks=8, max_model_len=16, policy="fifo")
    sched = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_model_len=16))
    with pytest.raises(ValueError):
        sched.add(Sequence(0, "r", list(range(17))))


def test_sequence_past_max_model_len_raises():
    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_num_batched_tokens=16, max_num_seqs=2,
                                      max_model_len=16))
    seq = Sequence(0, "r", list(range(15)))
    sched.add(seq)
    for _ in range(2):  # the engine "forgets" to stop the sequence at max_model_len
        sched.on_step_done(sched.schedule(), {0: 1})
    assert seq.num_tokens == 17
    with pytest.raises(SchedulerError):
        sched.schedule()


# --------------------------------------------------------------------------------- random simulation

@st.composite
def scenarios(draw):
    bs = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 40))
    max_num_seqs = draw(st.integers(1, 6))
    chunked = draw(st.booleans())
    budget = draw(st.integers(max(max_num_seqs, 1 if chunked else max_model_len), 64))
    num_blocks = draw(st.integers(-(-max_model_len // bs), 3 * -(-max_model_len // bs)))
    cfg = dict(num_blocks=num_blocks, block_size=bs, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
               max_model_len=max_model_len, enable_chunked_prefill=chunked,
               enable_prefix_caching=draw(st.booleans()), policy=draw(st.sampled_from(["continuous", "static"])),
               async_steps=draw(st.booleans()))
    reqs = []
    for _ in range(draw(st.integers(1, 12))):
        plen = draw(st.integers(1, max_model_len - 1))
        base = draw(st.sampled_from([0, 0, 1]))  # shared-prefix prompts are common
        prompt = [base] * (plen // 2) + draw(st.lists(st.integers(0, 3), min_size=plen - plen // 2,
                                                      max_size=plen - plen // 2))
        reqs.append((prompt, draw(st.integers(1, max_model_len - plen)), draw(st.integers(1, min(3, max_num_seqs))),
                     draw(st.integers(0, 6)), draw(st.booleans()) and draw(st.integers(0, 8))))
    return cfg, reqs, draw(st.integers(0, 2**16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_simulation(scenario):
    cfg, reqs, seed = scenario
    eng = FakeEngine(seed=seed, **cfg)
    pending = sorted(enumerate(reqs), key=lambda r: r[1][3])  # by arrival step
    added, aborts, step = {}, {}, 0
    while pending or eng.sched.has_unfinished():
        while pending and pending[0][1][3] <= step:
            i, (prompt, max_tokens, n, arrival, abort_after) = pending.pop(0)
            added[f"r{i}"] = (eng.add(f"r{i}", prompt, max_tokens, n), max_tokens)
            if abort_after is not False:
                aborts[f"r{i}"] = step + abort_after
        for rid, when in list(aborts.items()):
            if when <= step:
                eng.sched.abort(rid)
                del aborts[rid]
        if eng.sched.has_unfinished():
            eng.step()
        step += 1
        assert step < 5000
    for rid, (seqs, max_tokens) in added.items():
        for seq in seqs:
            assert seq.is_finished
            if seq.status != SequenceStatus.FINISHED_ABORTED:
                want = min(max_tokens, cfg["max_model_len"] - seq.num_prompt_tokens)
                assert len(seq.output_token_ids) == want
    eng.assert_pool_full()
    event(f"async={eng.async_steps}, preempted={any(out.preempted for out, _ in eng.steps)}")
    event(f"copies={any(out.blocks_to_copy for out, _ in eng.steps)}")
    event(f"prefix_hits={eng.sched.pool.hit_tokens > 0}")
    m = eng.sched.metrics()
    assert m["num_running"] == 0 and m["num_waiting"] == 0 and m["used_blocks"] == 0
