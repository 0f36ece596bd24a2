"""Iteration-level (continuous) batching scheduler, like vLLM's: decides, every step, which sequences run and
how many tokens each computes. Pure Python; the KV block bookkeeping lives in the functional ``block_pool``.

One step (``schedule``):
 1. decodes first: one token for every running sequence that has only its last sampled token left;
 2. then prefill chunks of running sequences whose prompt is only partly computed (chunked prefill);
 3. then admit waiting sequences FCFS while there are sequence slots, token budget and blocks.
When blocks run out in 1-2, the most recently admitted not-yet-scheduled running sequence is preempted by
recompute (blocks freed — registered ones stay in the prefix cache — and it goes to the front of the waiting
queue; its generated tokens are kept and recomputed as part of its prompt). A step that preempted admits
nothing, so a freshly preempted sequence is not replaced by a newcomer in the same step.

n > 1 (sequences sharing ``group_id``): only the first ("leader") is queued. It prefills all but the last
prompt token; then the siblings are forked from it (sharing every prompt block) and all n compute the last
prompt token as a one-token decode, each sampling its own first token from its own logits row. The shared
partial last block is copy-on-write, so each sibling ends up with a private copy.

Contract with the engine: per step, ``schedule()`` -> run ``blocks_to_copy`` then the model on
``scheduled`` -> ``on_step_done(output, sampled)`` -> ``finish()`` the sequences that stopped.

Async scheduling (the engine's default) runs one step ahead: ``sampled`` may hold ``PENDING_TOKEN`` for tokens
still on the device, and the next ``schedule()`` comes before the engine knows them. Such a token is the last
one of its sequence, past every position this module hashes or looks up, and the engine resolves it before the
sequence can be admitted again. A sequence whose pending token is its last one (max_tokens or max_model_len)
gets no further step: the engine finishes it when the token arrives.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from jaxinfer import block_pool as bp
from jaxinfer.sequence import PENDING_TOKEN, Sequence, SequenceStatus


class SchedulerError(RuntimeError):
    """A state the scheduler cannot make progress from (a configuration/engine contract violation)."""


@dataclass(kw_only=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "continuous"  # or "static": admit a batch only when nothing runs (benchmark baseline)

    def __post_init__(self) -> None:
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"unknown scheduling policy {self.policy!r}")
        # Progress guarantees: one max_model_len sequence always fits alone (so preemption can always make
        # room), and without chunking any prompt fits a step. (Every running sequence decoding each step is
        # guaranteed by the scheduler capping the running set at max_num_batched_tokens.)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"{self.num_blocks} blocks of {self.block_size} tokens cannot hold one "
                             f"max_model_len={self.max_model_len} sequence")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill max_num_batched_tokens must be >= max_model_len")


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed_tokens at schedule time)
    num_new_tokens: int  # tokens start .. start+num_new_tokens-1 of seq.all_token_ids
    block_table: list[int]
    samples: bool  # the chunk reaches the end of the known tokens: sample a token from its last row


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pool = bp.create(config.num_blocks, config.block_size, config.enable_prefix_caching)
        # Never run more sequences than one decode token each fits the token budget: decodes can't starve.
        self.max_num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        # Siblings not forked yet, by their leader's seq_id (the leader is in waiting or running).
        self._pending_forks: dict[int, list[Sequence]] = {}
        self._open_groups: dict[tuple, Sequence] = {}  # (request_id, group_id) -> leader, until it forks
        self._requests: dict[str, list[Sequence]] = {}  # unfinished sequences per request
        self._seqs: dict[int, Sequence] = {}  # unfinished sequences by seq_id
        self._next_arrival = 0
        self._num_preemptions = 0
        self._num_steps = 0
        self._last_num_tokens = 0

    # ----------------------------------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} already added")
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"sequence {seq.seq_id} has {seq.num_tokens} tokens > max_model_len="
                             f"{self.config.max_model_len} (the engine must reject it)")
        seq.status = SequenceStatus.WAITING
        seq.arrival_index = self._next_arrival
        self._next_arrival += 1
        self._seqs[seq.seq_id] = seq
        self._requests.setdefault(seq.request_id, []).append(seq)
        key = (seq.request_id, seq.group_id)
        leader = self._open_groups.get(key)
        if (leader is not None and leader.status == SequenceStatus.WAITING
                and leader.prompt_token_ids == seq.prompt_token_ids and not seq.output_token_ids):
            pending = self._pending_forks.setdefault(leader.seq_id, [])
            if len(pending) + 2 > self.max_num_seqs:
                raise ValueError(f"request {seq.request_id}: n={len(pending) + 2} > max_num_seqs")
            pending.append(seq)
            return
        # A 1-token prompt has nothing to share before its last token: its siblings just run on their own.
        if seq.group_id is not None and seq.num_tokens >= 2 and not seq.output_token_ids:
            self._open_groups[key] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of a request now, freeing their blocks. Returns the aborted sequences."""
        seqs = list(self._requests.get(request_id, ()))
        for seq in seqs:
            self.finish(seq.seq_id, SequenceStatus.FINISHED_ABORTED)
        return seqs

    def finish(self, seq_id: int, status: SequenceStatus) -> None:
        """The engine decided the sequence stopped: free its blocks so the slot is reused next step."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return  # already finished (e.g. abort after finish): idempotent
        if seq.status == SequenceStatus.RUNNING:
            self.pool = bp.free(self.pool, seq_id)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:  # a sibling waiting to be forked
            for pending in self._pending_forks.values():
                if seq in pending:
                    pending.remove(seq)
        if self._open_groups.get((seq.request_id, seq.group_id)) is seq:
            del self._open_groups[(seq.request_id, seq.group_id)]
        # Siblings still waiting on this leader get queued on their own (at the front: they are old).
        for sibling in reversed(self._pending_forks.pop(seq_id, [])):
            self.waiting.appendleft(sibling)
        seq.status = status
        request = self._requests[seq.request_id]
        request.remove(seq)
        if not request:
            del self._requests[seq.request_id]

    # -------------------------------------------------------------------------------------------- steps

    def _target_len(self, seq: Sequence) -> int:
        """Tokens the sequence computes before it samples: all known ones, except that a leader with siblings
        to fork stops one short, so that every sibling computes (and samples from) the last prompt token."""
        return seq.num_tokens - 1 if self._pending_forks.get(seq.seq_id) else seq.num_tokens

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput()
        scheduled_ids: set[int] = set()
        budget = cfg.max_num_batched_tokens
        may_admit = cfg.policy == "continuous" or not self.running  # static: only between batches

        def emit(seq: Sequence, num_new: int) -> None:
            start = seq.num_computed_tokens
            out.scheduled.append(ScheduledSeq(seq, start, num_new, list(bp.block_table(self.pool, seq.seq_id)),
                                              samples=start + num_new == seq.num_tokens))
            scheduled_ids.add(seq.seq_id)

        # 1. Decodes first: they are latency-critical and cheap (one token each); self.max_num_seqs <=
        #    max_num_batched_tokens guarantees they all fit the budget.
        decodes = [(seq, 1) for seq in self.running if not self._final_token_pending(seq)
                   and self._remaining(seq) == 1 and seq.num_computed_tokens == seq.num_tokens - 1]
        for seq, _ in self._reserve(decodes, scheduled_ids, out):
            emit(seq, 1)
            budget -= 1
        # 2. Continue partially computed prompts (chunked prefill, or recompute after preemption), oldest first.
        for seq in list(self.running):
            if budget == 0:
                break
            if (seq.status != SequenceStatus.RUNNING or seq.seq_id in scheduled_ids
                    or self._final_token_pending(seq)):
                continue
            remaining = self._remaining(seq)
            chunk = min(remaining, budget)
            if not cfg.enable_chunked_prefill and chunk < remaining:
                continue  # must go in one piece: wait for a step with more budget left
            if cfg.enable_chunked_prefill:
                # Use what memory is free rather than preempting someone; preempt only if nothing is free.
                chunk = min(chunk, max(1, self._free_slots(seq)))
            if self._reserve([(seq, chunk)], scheduled_ids, out):
                emit(seq, chunk)
                budget -= chunk
        # 3. Admit waiting sequences, FCFS. Not in a step that had to preempt: memory is short, and the
        #    preempted sequences (now at the head of the queue) must not be overtaken.
        if may_admit and not out.preempted:
            budget = self._admit(budget, emit)

        finishing = any(self._final_token_pending(seq) for seq in self.running)  # async: final token pending
        if not out.scheduled and not out.preempted and self.has_unfinished() and not finishing:
            raise SchedulerError(f"no progress possible: {len(self.running)} running, "
                                 f"{len(self.waiting)} waiting, {bp.num_free_blocks(self.pool)} free blocks")
        self._num_steps += 1
        self._last_num_tokens = cfg.max_num_batched_tokens - budget
        return out

    def _admit(self, budget: int, emit) -> int:
        cfg = self.config
        static = cfg.policy == "static"
        while self.waiting and (budget > 0 or static):
            seq = self.waiting[0]
            group_size = 1 + len(self._pending_forks.get(seq.seq_id, ()))
            if self._num_seats_taken() + group_size > self.max_num_seqs:
                break
            if seq.num_tokens > cfg.max_model_len:
                raise SchedulerError(f"{seq} is longer than max_model_len={cfg.max_model_len}")
            target = self._target_len(seq)
            token_ids = seq.all_token_ids[:target]
            use_cache = not seq.skip_prefix_cache
            num_cached = bp.num_cached_tokens(self.pool, token_ids, use_cache)
            remaining = target - num_cached
            chunk = min(remaining, budget)
            if not cfg.enable_chunked_prefill and chunk < remaining:
                chunk = 0
            if cfg.enable_chunked_prefill:
                chunk = min(chunk, bp.max_allocatable_tokens(self.pool, token_ids, use_cache))
            # Continuous batching admits only what it computes now; static admits the whole batch at once and
            # computes the prompts over the next steps (as the budget allows).
            if chunk == 0 and not static:
                break
            if not bp.can_allocate(self.pool, token_ids, chunk, use_cache):
                break
            self.pool, num_cached = bp.allocate(self.pool, seq.seq_id, token_ids, chunk, use_cache)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached
            self.running.append(seq)
            if chunk:
                emit(seq, chunk)
                budget -= chunk
        return budget

    def _num_seats_taken(self) -> int:
        """Running sequences plus the siblings that running leaders will fork (their seats are reserved at
        the leader's admission, so a fork never exceeds max_num_seqs). A sequence whose final token is pending
        (async) takes no seat: it gets no more steps, so its slot is refilled as soon as a synchronous engine
        would have finished it."""
        running = sum(not self._final_token_pending(seq) for seq in self.running)
        return running + sum(len(pending) for leader_id, pending in self._pending_forks.items()
                                       if self._seqs[leader_id].status == SequenceStatus.RUNNING)

    def _final_token_pending(self, seq: Sequence) -> bool:
        """Async scheduling: the sequence's last token is still on the device and is its final one (max_tokens
        or max_model_len), so the engine will finish it when the token arrives."""
        if not seq.output_token_ids or seq.output_token_ids[-1] != PENDING_TOKEN:
            return False
        cap = seq.max_output_tokens
        return (cap is not None and len(seq.output_token_ids) >= cap) or seq.num_tokens >= self.config.max_model_len

    def _remaining(self, seq: Sequence) -> int:
        remaining = self._target_len(seq) - seq.num_computed_tokens
        assert remaining >= 1, f"running {seq} has nothing to compute"
        assert bp.num_seq_tokens(self.pool, seq.seq_id) == seq.num_computed_tokens, f"{seq} out of sync"
        if seq.num_tokens > self.config.max_model_len:
            raise SchedulerError(f"{seq} grew past max_model_len={self.config.max_model_len}: "
                                 "the engine must finish sequences at max_model_len")
        return remaining

    def _free_slots(self, seq: Sequence) -> int:
        """Token slots a running sequence can grow by without anyone being preempted."""
        bs = self.config.block_size
        entry = self.pool.seqs[seq.seq_id]
        return len(entry.blocks) * bs - entry.num_tokens + bp.num_free_blocks(self.pool) * bs

    def _reserve(self, requests: list[tuple[Sequence, int]], scheduled_ids: set[int],
                 out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Grow each ``(seq, num_new)`` in order, preempting the most recently admitted not-yet-scheduled
        sequence whenever blocks are short (possibly one of ``requests``, even the one being grown).
        Returns the requests that got their slots."""
        granted: list[tuple[Sequence, int]] = []
        while requests:
            self.pool, copies, done = bp.append_slots_batch(self.pool, [(s.seq_id, n) for s, n in requests])
            out.blocks_to_copy.extend(copies)
            granted += requests[:done]
            scheduled_ids.update(s.seq_id for s, _ in requests[:done])
            requests = requests[done:]
            if requests:  # requests[0] does not fit
                candidates = [s for s in reversed(self.running) if s.seq_id not in scheduled_ids]
                # A sequence about to finish (async: its final token pending) gives its blocks up for free.
                victim = next((s for s in candidates if self._final_token_pending(s)), candidates[0])
                if len(self.running) == 1:
                    raise SchedulerError(f"{victim} cannot fit in the KV pool even alone "
                                         f"({self.config.num_blocks} blocks)")
                self._preempt(victim)
                out.preempted.append(victim)
                requests = [(s, n) for s, n in requests if s is not victim]
        return granted

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the KV (registered blocks stay in the prefix cache, so the recompute is
        often cheap) and requeue at the front, keeping the generated tokens."""
        self.pool = bp.free(self.pool, seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(seq)

    def on_step_done(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Account for a finished model step: ``sampled`` maps seq_id -> token for every scheduled sequence
        with ``samples`` set."""
        bs = self.config.block_size
        to_cache, to_fork = [], []
        for s in output.scheduled:
            seq = s.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # finished or aborted since schedule()
            assert seq.num_computed_tokens == s.start, f"{seq}: step bookkeeping out of order"
            seq.num_computed_tokens += s.num_new_tokens
            if s.samples:
                if seq.seq_id not in sampled:
                    raise KeyError(f"no sampled token for sequence {seq.seq_id}")
                seq.output_token_ids.append(sampled[seq.seq_id])
            if self.config.enable_prefix_caching and s.start // bs != seq.num_computed_tokens // bs:
                # A block just became full and its K/V is now written: make it reusable by later prompts.
                to_cache.append((seq.seq_id, seq.all_token_ids, seq.num_computed_tokens))
            if self._pending_forks.get(seq.seq_id) and seq.num_computed_tokens == seq.num_tokens - 1:
                to_fork.append(seq)
        if to_cache:
            self.pool = bp.cache_full_blocks_batch(self.pool, to_cache)
        for leader in to_fork:  # after caching, so the siblings inherit the prompt blocks' hashes
            self._fork(leader)

    def _fork(self, leader: Sequence) -> None:
        """All but the last prompt token of the leader are computed: the siblings share those blocks."""
        self._open_groups.pop((leader.request_id, leader.group_id), None)
        for sibling in self._pending_forks.pop(leader.seq_id):
            self.pool = bp.fork(self.pool, leader.seq_id, sibling.seq_id)
            sibling.status = SequenceStatus.RUNNING
            sibling.num_computed_tokens = leader.num_computed_tokens
            sibling.num_cached_tokens = leader.num_cached_tokens
            self.running.append(sibling)

    # ------------------------------------------------------------------------------------------ queries

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        # queued + siblings waiting to be forked (max(0): a reader on another thread may see the two sizes
        # straddle an admission)
        return max(0, len(self._seqs) - len(self.running))

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    def metrics(self) -> dict[str, float]:
        m = bp.metrics(self.pool)
        m.update(num_running=self.num_running, num_waiting=self.num_waiting,
                 num_preemptions=self._num_preemptions, num_steps=self._num_steps,
                 num_batched_tokens=self._last_num_tokens)
        return m
