"""EngineCore: token ids in, token ids out, one model step per `step()` call (vLLM V1's EngineCore).

It owns the weights, the scheduler and the model runner, and nothing that touches text: requests arrive as
validated `EngineRequest`s (token ids), and each step returns a `RequestDelta` per request that got tokens, with
the finish reasons that need no text (EOS, stop token ids, max_tokens, max_model_len). Stop strings are decided
by the front end, which calls `finish_sequence`; so the thread that steps the model never detokenizes.

Each step: the scheduler picks a flat batch (decodes first, then prefill chunks), the runner executes it on
device, then the core appends the sampled tokens and finishes sequences that stopped, freeing their KV blocks at
once.

Async scheduling (default) keeps one step in flight: step N+1 is scheduled and launched with placeholders for
step N's sampled tokens, which the device feeds in; then the host reads step N's tokens and processes them while
the device computes N+1. A sequence that stopped at step N (EOS, stop string) wastes its row in N+1, which is
dropped; max_tokens and max_model_len are known ahead, so those sequences get no extra row.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import distributed, sampler
from jaxinfer.attention import default_attention_backend
from jaxinfer.batch import SeqChunk
from jaxinfer.engine_args import EngineArgs
from jaxinfer.engine_io import EngineRequest, RequestDelta, SequenceDelta
from jaxinfer.errors import InvalidRequestError, QueueFullError
from jaxinfer.executable_cache import SUBDIR as EXECUTABLES_SUBDIR
from jaxinfer.kv_budget import kv_budget_bytes, num_kv_blocks, resolve_max_model_len
from jaxinfer.loaders import load_params, open_checkpoint, params_nbytes
from jaxinfer.model_runner import ModelRunner, StepHandle, enable_compilation_cache
from jaxinfer.quantization.on_load import check_mode
from jaxinfer.quantization.runtime import PackedRuntime, prepare_packed_weights
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxinfer.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from jaxinfer.sharding import ShardingPlan, make_mesh
from jaxinfer.stats import EngineStats, RequestTimings, StartupTimes, StepRecord

_NO_SAMPLE = SamplingParams(temperature=0.0)  # rows of prefill chunks that don't sample yet
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_STATUS = {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH_CAPPED}


@dataclasses.dataclass(eq=False)
class _Request:
    request: EngineRequest
    seed: int
    seqs: list[Sequence]
    index_of: dict[int, int]  # seq_id -> its sample index
    timings: RequestTimings
    unscheduled: bool = True  # no step has run it yet: its prompt counts as waiting
    # prompt_logprobs: entries computed so far (entry 0, for the first token, is None), and those not yet sent
    num_prompt_logprobs: int = 1
    new_prompt_logprobs: list | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclasses.dataclass
class _LaunchedStep:
    sched: SchedulerOutput
    handle: StepHandle
    targets: list[list[int]]    # per scheduled sequence: prompt_logprobs targets (-1 = none)
    sample_rows: dict[int, int]  # seq_id -> its row of the sampler output, for sequences that sample
    schedule_s: float
    launch_start: float  # perf_counter() when the runner started launching it


def _activation_dtypes(args: EngineArgs):
    """(activation, KV cache) dtypes for these args on this backend."""
    dtype = _DTYPES[args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")]
    return dtype, (_DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else dtype)


def default_weight_dtype(config, verbose: bool = True) -> str:
    """bfloat16 on accelerators; on CPU whichever of bf16 and f32 this machine runs faster (measured once per
    machine and cached: cpu_probe.py), since that depends on the CPU's vector extensions."""
    if jax.default_backend() != "cpu":
        return "bfloat16"
    from jaxinfer.cpu_probe import choose_weight_dtype

    choice = choose_weight_dtype(config)
    if verbose:
        print(f"[jaxinfer] weight dtype {choice.dtype}: {choice.reason}"
              f"{' (cached measurement)' if choice.cached else ''}; weight_dtype= overrides", flush=True)
    return choice.dtype


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `load_model` returns and `EngineCore` runs: the weights, laid out by `plan` on a mesh (tensor /
    pipeline parallelism; None: one device), and the channel of a multi-process run (None: one process)."""
    config: Any
    params: Any
    plan: ShardingPlan | None = None
    channel: distributed.Channel | None = None
    packed: PackedRuntime | None = None  # how packed (quantized) weights run (jaxinfer.quantization.runtime)


def load_model(args: EngineArgs) -> LoadedModel:
    """`args.model`'s weights in the dtypes the core will run it at, placed on the mesh the args ask for, and how
    packed (quantized) weights run on this backend (`jaxinfer.quantization.runtime`)."""
    # Before anything touches a device: a multi-process run joins jax.distributed first.
    channel = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    is_follower = channel is not None and not channel.is_leader
    enable_compilation_cache(args.compilation_cache_dir)  # loading may compile (dequantization)
    checkpoint = open_checkpoint(args.model)
    dtype, _ = _activation_dtypes(args)
    weight_dtype = args.weight_dtype or (None if is_follower else default_weight_dtype(checkpoint.config,
                                                                                        args.verbose))
    weight_dtype = _DTYPES[channel.agree(weight_dtype) if channel else weight_dtype]  # process 0's choice
    # The embedding and LM head are kept at the activation precision when it is wider than the weights'
    # (f32 with bf16 weights): `layers.linear` rounds its input to the weight dtype, and at the LM head, and
    # with tied embeddings at the lookup, bf16 flips close calls between the top tokens (SmolLM2-135M then
    # answers "What is the capital of France?" with "L'Étoile, la Marseillaise, ..." where HF fp32 says "The
    # capital of France is Paris."). It is one matrix, 0.06 GiB more for SmolLM2.
    head_dtype = max(weight_dtype, dtype, key=lambda d: jnp.dtype(d).itemsize)
    quantization = check_mode(args.quantization)
    # An explicit weight_dtype with no quantization asks for float weights: packed checkpoints are expanded too
    on_load = "dequantize" if quantization is None and args.weight_dtype else quantization
    plan = None
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        plan = ShardingPlan(checkpoint.config, make_mesh(args.tensor_parallel_size, args.pipeline_parallel_size))
        if args.verbose:
            print(f"[jaxinfer] {plan.describe()}", flush=True)
    params = load_params(checkpoint, weight_dtype, head_dtype=head_dtype, quantization=on_load,
                         verbose=args.verbose, place=plan.place if plan else None)
    # On a mesh packed weights run as placed: the CPU default's re-quantization / expansion would undo the layout
    packed = prepare_packed_weights(checkpoint.config, params, backend=jax.default_backend(),
                                    quantization=quantization or ("packed" if plan else None),
                                    matmul_backend=args.matmul_backend, float_dtype=weight_dtype,
                                    head_dtype=head_dtype, probe=channel is None)  # processes must agree
    if args.verbose and packed.note:
        print(f"[jaxinfer] {packed.note}; weights hold {params_nbytes(packed.params) / 2**30:.3f} GiB", flush=True)
    params = packed.params
    return LoadedModel(checkpoint.config, plan.finish(params) if plan else params, plan, channel, packed)


class EngineCore:
    def __init__(self, args: EngineArgs, model: LoadedModel, extra_eos_token_ids: Iterable[int] = ()):
        """Build the KV cache, runner and scheduler around loaded weights (`load_model`).
        `extra_eos_token_ids`: ids that end a sequence besides the model config's (the tokenizer's EOS).
        In a multi-process run, the other processes' cores only follow process 0's device calls: their
        constructor returns when process 0 is done (`is_follower`)."""
        build_start = time.perf_counter()
        self.args = args
        self.async_scheduling = (jax.default_backend() != "cpu" if args.async_scheduling is None
                                 else args.async_scheduling)
        cache_dir = enable_compilation_cache(args.compilation_cache_dir)
        dtype, kv_dtype = _activation_dtypes(args)
        self.config, self.plan, channel = model.config, model.plan, model.channel
        self.is_follower = channel is not None and not channel.is_leader
        self.packed = packed = model.packed  # how packed weights run (None: args.matmul_backend, no XLA plan)
        self.weight_bytes = params_nbytes(model.params)  # what the devices hold: packed codes, scales and offsets
        self.eos_token_ids = set(self.config.eos_token_ids) | set(extra_eos_token_ids)
        self.max_model_len = resolve_max_model_len(self.config.max_position_embeddings, args.max_model_len)
        # One block's bytes on each device: its stage's layers and its shard's KV heads.
        local = self.plan.local_config if self.plan else self.config
        block_bytes = args.block_size * self.config.kv_bytes_per_token(
            jnp.dtype(kv_dtype).itemsize, num_layers=local.num_layers, num_kv_heads=local.num_kv_heads)
        num_blocks = self._num_kv_blocks(block_bytes, channel)
        if args.verbose:
            where = f"per device, {self.plan.mesh.size} devices" if self.plan else f"on {jax.default_backend()}"
            print(f"[jaxinfer] KV cache: {num_blocks} blocks x {args.block_size} tokens = "
                  f"{num_blocks * args.block_size} tokens, {num_blocks * block_bytes / 2**30:.2f} GiB "
                  f"({jnp.dtype(kv_dtype).name}) {where}", flush=True)
        self.runner = ModelRunner(
            self.config, model.params, num_blocks=num_blocks, block_size=args.block_size,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=self.max_model_len, kv_dtype=kv_dtype,
            attention_backend=args.attention_backend or default_attention_backend(),
            matmul_backend=packed.matmul_backend if packed else args.matmul_backend or "xla",
            quant_plan=packed.plan if packed else None, compiler_options=packed.compiler_options if packed else None,
            dtype=dtype, plan=self.plan, num_microbatches=args.pipeline_microbatches, channel=channel,
            executable_cache_dir=(os.path.join(cache_dir, EXECUTABLES_SUBDIR)
                                  if cache_dir and args.executable_cache else None))
        if channel is not None:
            channel.release_at_exit(self.runner)
        if self.is_follower:  # make process 0's device calls until it exits; this core takes no requests
            self.runner.follow()
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
            policy=args.scheduler_policy))
        self.stats = EngineStats(self._gauges)
        self._requests: dict[str, _Request] = {}
        self._inflight: _LaunchedStep | None = None  # async scheduling: the step whose results are unread
        self._static_rows = 0  # static policy: rows the current batch keeps until it finishes
        self._seq_ids = itertools.count()
        self._waiting_prompt_tokens = 0  # prompt tokens of requests no step has run yet
        self._compiled_at_warmup = 0
        self._last_fetch_end = 0.0  # perf_counter(): when the device could start the next queued step
        self._startup = dict(load_s=0.0, engine_build_s=time.perf_counter() - build_start, warmup_s=0.0)

    def record_load_time(self, seconds: float) -> None:
        """The front end's time loading weights and tokenizer, for `stats.snapshot().startup`."""
        self._startup["load_s"] = seconds

    def _startup_times(self) -> StartupTimes:
        records, runner = list(self.runner.warmup_records), self.runner
        total = lambda field: sum(getattr(r, field) for r in records)
        st = self._startup
        return StartupTimes(
            load_s=st["load_s"], engine_build_s=st["engine_build_s"], trace_s=total("trace_s"),
            lower_s=total("lower_s"), compile_s=total("compile_s"), executable_load_s=total("load_s"),
            executable_store_s=total("store_s"), warmup_steps_s=runner.warmup_steps_s,
            time_to_ready_s=st["load_s"] + st["engine_build_s"] + st["warmup_s"],
            num_executables_loaded=sum(r.source == "loaded" for r in records),
            num_executables_compiled=sum(r.source == "compiled" for r in records),
            num_executables_pending=runner.num_warmup_pending)

    def _num_kv_blocks(self, bytes_per_block: int, channel) -> int:
        """Blocks that fit every device's budget. The pool is global: each device holds every block, for its own
        layers and KV heads, so the tightest device (of every process) decides."""
        a = self.args
        if a.num_kv_blocks:
            return a.num_kv_blocks
        devices = list(self.plan.mesh.devices.flat) if self.plan else jax.devices()[:1]
        budget = min(kv_budget_bytes(a.kv_cache_memory_gb, a.kv_cache_memory_fraction, d.memory_stats(),
                                     num_devices=len(devices))
                     for d in devices if d.process_index == jax.process_index())
        budget = channel.min(budget) if channel else budget
        return num_kv_blocks(budget, bytes_per_block, self.max_model_len, a.block_size)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request: EngineRequest) -> None:
        """Admit a request the front end validated (`processor.py`). Raises InvalidRequestError (request id in
        use) or QueueFullError before anything is queued."""
        if self.is_follower:
            raise RuntimeError(f"process {self.args.process_id} follows process 0's steps; send requests to "
                               "process 0")
        a, num_prompt = self.args, len(request.prompt_token_ids)
        if request.request_id in self._requests:
            raise InvalidRequestError("request_id", f"request_id {request.request_id!r} is already in use")
        if self.scheduler.num_waiting >= a.max_waiting_requests:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are waiting "
                                 f"(max_waiting_requests={a.max_waiting_requests}); retry later")
        limit = a.max_waiting_prompt_tokens
        # A prompt fits when the waiting prompts plus its own stay within the limit, or when nothing waits (so a
        # prompt longer than the limit is not refused forever).
        if limit is not None and self._waiting_prompt_tokens and self._waiting_prompt_tokens + num_prompt > limit:
            raise QueueFullError(f"{self._waiting_prompt_tokens} prompt tokens are waiting, {num_prompt} more would "
                                 f"exceed max_waiting_prompt_tokens={limit}; retry later",
                                 limit="max_waiting_prompt_tokens")
        if not self._requests:  # idle until now: an unread step in flight finished long ago
            self._last_fetch_end = time.perf_counter()
        params, ids = request.params, request.prompt_token_ids
        seqs = [Sequence(next(self._seq_ids), request.request_id, ids, params, group_id=0 if params.n > 1 else None,
                         skip_prefix_cache=params.prompt_logprobs is not None,  # as vLLM: every position computed
                         max_output_tokens=params.max_tokens)
                for _ in range(params.n)]
        timings = self.stats.request_added(request.request_id, request.arrival_time, num_prompt, params.n)
        self._requests[request.request_id] = _Request(
            request, sampler.new_request_seed(), seqs, {s.seq_id: i for i, s in enumerate(seqs)}, timings,
            new_prompt_logprobs=[] if params.prompt_logprobs is not None else None)
        self._waiting_prompt_tokens += num_prompt
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request now (client gone or cancelled); its KV blocks are freed immediately. Returns the final
        delta (finish_reason "abort" for every sample still running), or None for an unknown request."""
        req = self._requests.get(request_id)
        running = [index for index, seq in enumerate(req.seqs) if not seq.is_finished] if req else []
        self.scheduler.abort(request_id)
        if req is None:
            return None
        now = time.monotonic()
        for index in running:
            self.stats.sequence_finished(req.timings, index, "abort")
        self._forget(req, now)
        deltas = [SequenceDelta(index, [], finish_reason="abort") for index in running]
        return RequestDelta(request_id, deltas, now, finished=True)

    def finish_sequence(self, request_id: str, index: int, num_output_tokens: int) -> None:
        """The front end ended sample `index` on a stop string after its first `num_output_tokens` tokens (any
        the core sampled past them are dropped). Unknown or finished: nothing happens."""
        req = self._requests.get(request_id)
        if req is None or req.seqs[index].is_finished:
            return
        seq = req.seqs[index]
        produced = len(seq.output_token_ids) - int(seq.output_token_ids[-1:] == [PENDING_TOKEN])
        self.stats.tokens_dropped(req.timings, produced - num_output_tokens)
        self._finish(req, seq, "stop")
        if all(s.is_finished for s in req.seqs):
            self._forget(req, time.monotonic())

    def _finish(self, req: _Request, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq.seq_id, _STATUS[reason])
        self.stats.sequence_finished(req.timings, req.index_of[seq.seq_id], reason)

    def _forget(self, req: _Request, now: float) -> None:
        del self._requests[req.request.request_id]
        if req.unscheduled:
            self._waiting_prompt_tokens -= len(req.request.prompt_token_ids)
        self.stats.request_finished(req.timings, now)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def step_in_flight(self) -> bool:
        """Async scheduling: a launched step's results are not read yet."""
        return self._inflight is not None

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestDelta]:
        """Run one model step; return a delta for each request that got tokens.

        With async scheduling the step is launched before the previous one's results are read, so host work
        (reading results, stop checks, scheduling the next step) overlaps device work, and the deltas returned
        are those of the previous step."""
        deltas = []
        previous, self._inflight = self._inflight, None
        launched = self._launch(previous)
        if previous is not None:
            deltas = self._complete(previous)  # while the device runs `launched`
        if launched is not None:
            pending = {s.seq.seq_id: PENDING_TOKEN for s in launched.sched.scheduled if s.samples}
            self.scheduler.on_step_done(launched.sched, pending)
            if self.async_scheduling:
                self._inflight = launched
            else:
                deltas = self._complete(launched)
        return deltas

    def _launch(self, previous: _LaunchedStep | None) -> _LaunchedStep | None:
        new_batch = self.scheduler.num_running == 0
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        schedule_s = time.perf_counter() - start
        if sched.is_empty:
            return None
        if self.args.scheduler_policy == "static":
            # Static batching as in HF generate and the vLLM paper's baseline: the batch keeps its rows until its
            # longest request ends, finished sequences becoming padding rows.
            self._static_rows = len(sched.scheduled) if new_batch else max(self._static_rows, len(sched.scheduled))
        self.runner.copy_blocks(sched.blocks_to_copy)
        previous_rows = previous.sample_rows if previous is not None else {}
        chunks, rows, targets = [], [], []
        need_prompt_logprobs = False
        now = time.monotonic()
        for s in sched.scheduled:
            seq, req = s.seq, self._requests[s.seq.request_id]
            if req.unscheduled:
                req.unscheduled = False
                self._waiting_prompt_tokens -= len(req.request.prompt_token_ids)
                self.stats.request_scheduled(req.timings, now)
            tokens = seq.all_token_ids
            chunk = tokens[s.start:s.start + s.num_new_tokens]
            pending_row = previous_rows[seq.seq_id] if chunk[-1] == PENDING_TOKEN else -1
            chunks.append(SeqChunk(chunk, s.start, s.block_table, pending_row))
            index = req.index_of[seq.seq_id]
            rows.append(sampler.RowInfo(params=req.params, seed=sampler.row_seed(req.params, req.seed, index),
                                        step=len(seq.output_token_ids), prompt_token_ids=seq.prompt_token_ids,
                                        output_token_ids=seq.output_token_ids, pending_row=pending_row)
                        if s.samples else sampler.RowInfo(params=_NO_SAMPLE, seed=0, step=0))
            # Entry j of prompt_logprobs is for prompt token j; positions recomputed after a preemption already
            # have theirs.
            wants_prompt_logprobs = req.new_prompt_logprobs is not None and index == 0
            have = req.num_prompt_logprobs if wants_prompt_logprobs else seq.num_prompt_tokens
            targets.append([tokens[p + 1] if have <= p + 1 < seq.num_prompt_tokens else -1
                            for p in range(s.start, s.start + s.num_new_tokens)])
            need_prompt_logprobs |= any(t >= 0 for t in targets[-1])
        launch_start = time.perf_counter()
        handle = self.runner.launch(chunks, rows, targets if need_prompt_logprobs else None,
                                    min_tokens=self._static_rows, previous=previous and previous.handle)
        sample_rows = {s.seq.seq_id: i for i, s in enumerate(sched.scheduled) if s.samples}
        return _LaunchedStep(sched, handle, targets, sample_rows, schedule_s, launch_start)

    def _complete(self, step: _LaunchedStep) -> list[RequestDelta]:
        """Wait for a launched step, write its sampled tokens into their sequences and check the stops."""
        wait_start = time.perf_counter()
        result, prompt_lp = self.runner.fetch(step.handle)
        done = time.perf_counter()
        h = step.handle
        self.stats.step_completed(StepRecord(
            step.sched.num_batched_tokens, h.num_tokens, len(step.sched.scheduled), step.schedule_s, h.build_s,
            h.dispatch_s, done - wait_start, done - max(step.launch_start, self._last_fetch_end)))
        self._last_fetch_end = done
        now = time.monotonic()
        deltas: dict[str, RequestDelta] = {}
        offsets = np.cumsum([0] + [s.num_new_tokens for s in step.sched.scheduled])
        for i, s in enumerate(step.sched.scheduled):
            req = self._requests.get(s.seq.request_id)
            if req is None or s.seq.is_finished:
                continue  # aborted, or stopped on an earlier token while this step ran: its row is dropped
            if prompt_lp is not None and any(t >= 0 for t in step.targets[i]):
                self._add_prompt_logprobs(req, prompt_lp, int(offsets[i]), step.targets[i])
            if s.samples:
                s.seq.resolve_pending_token(int(result.token_ids[i]))
                delta = deltas.get(req.request.request_id)
                if delta is None:
                    delta = deltas[req.request.request_id] = RequestDelta(req.request.request_id, [], now)
                delta.sequences.append(self._append_token(req, s.seq, result, i))
        for request_id, delta in deltas.items():
            req = self._requests[request_id]
            self.stats.tokens_generated(req.timings, len(delta.sequences), now)
            if req.new_prompt_logprobs:
                delta.prompt_logprobs, req.new_prompt_logprobs = req.new_prompt_logprobs, []
            if all(s.is_finished for s in req.seqs):
                delta.finished = True
                self._forget(req, now)
        return list(deltas.values())

    def _append_token(self, req: _Request, seq: Sequence, result, row: int) -> SequenceDelta:
        p, token = req.params, seq.output_token_ids[-1]
        logprobs = None
        if p.logprobs is not None:
            entry = {int(t): float(lp) for t, lp in zip(result.top_ids[row][:p.logprobs], result.top_logprobs[row])}
            entry[token] = float(result.logprob[row])
            logprobs = [entry]
        delta = SequenceDelta(req.index_of[seq.seq_id], [token], logprobs)
        if token in self.eos_token_ids and not p.ignore_eos:
            delta.finish_reason = "stop"
        elif token in p.stop_token_ids:
            delta.finish_reason, delta.stop_reason = "stop", token
        elif (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            delta.finish_reason = "length"
        if delta.finish_reason:
            self._finish(req, seq, delta.finish_reason)
        return delta

    def _add_prompt_logprobs(self, req: _Request, prompt_lp, offset: int, targets: list[int]) -> None:
        target_lp, top_ids, top_lp = prompt_lp
        k = req.params.prompt_logprobs
        for j, t in enumerate(targets):
            if t < 0:
                continue
            entry = {int(i): float(lp) for i, lp in zip(top_ids[offset + j][:k], top_lp[offset + j][:k])}
            entry[t] = float(target_lp[offset + j])
            req.new_prompt_logprobs.append(entry)
            req.num_prompt_logprobs += 1

    # ------------------------------------------------------------------------------------------- metrics
    def _gauges(self) -> dict[str, Any]:
        """The scheduler- and runner-owned parts of a stats snapshot (safe to read from another thread: the
        block pool state is immutable, the rest are sizes and ints)."""
        sched, pool = self.scheduler, self.scheduler.pool
        return dict(num_preemptions=sched.num_preemptions, prefix_cache_queried_tokens=pool.queried_tokens,
                    prefix_cache_hit_tokens=pool.hit_tokens,
                    num_compilations_after_warmup=self.runner.num_compiled() - self._compiled_at_warmup,
                    num_running=len(sched.running), num_waiting=sched.num_waiting,
                    num_waiting_prompt_tokens=self._waiting_prompt_tokens, kv_blocks_used=len(pool.ref_counts),
                    kv_blocks_total=pool.num_blocks, startup=self._startup_times())

    def metrics(self) -> dict[str, Any]:
        """Scheduler and block-pool metrics (including fragmentation, which walks every live sequence) and the
        request counters, as one flat dict."""
        m = dict(self.scheduler.metrics())
        s = self.stats
        m.update(num_requests=s.num_requests, num_generated_tokens=s.num_generation_tokens,
                 num_prompt_tokens=s.num_prompt_tokens, num_compiled_step_variants=self.runner.num_compiled(),
                 weight_bytes=self.weight_bytes)
        return m

    def warmup(self, param_variants=None, token_counts=None, background: bool | None = None) -> float:
        """Make every token bucket ready (greedy and random sampling by default), or only the buckets that steps
        of these token counts use (a one-shot run that knows its prompt): loaded from the executable cache or
        compiled (ModelRunner.warmup). background (default: args.background_warmup): return once the smallest
        and largest buckets are ready. Compilations after this count in
        `stats.snapshot().num_compilations_after_warmup`; its split is in `stats.snapshot().startup`."""
        variants = param_variants or [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
        background = self.args.background_warmup if background is None else background
        seconds = self.runner.warmup(variants, token_counts, background=background and not token_counts)
        self._compiled_at_warmup = self.runner.num_compiled()
        self._startup["warmup_s"] += seconds
        return seconds
