"""LLMEngine: requests in, streamed outputs out, one model step per `step()` call (as vLLM's LLMEngine).

Each step: the scheduler picks a flat batch (decodes first, then prefill chunks), the runner executes it on
device, then the engine appends sampled tokens, detokenizes incrementally and decides who stopped (EOS, stop
ids, stop strings, max_tokens, max_model_len). Finished sequences free their KV blocks at once.

Async scheduling (default) keeps one step in flight: step N+1 is scheduled and launched with placeholders for
step N's sampled tokens, which the device feeds in; then the host reads step N's tokens and processes them while
the device computes N+1. A sequence that stopped at step N (EOS, stop string) wastes its row in N+1, which is
dropped; max_tokens and max_model_len are known ahead, so those sequences get no extra row.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import sampler
from jaxinfer.attention import default_attention_backend
from jaxinfer.batch import SeqChunk
from jaxinfer.loaders import load_params, open_checkpoint, params_nbytes
from jaxinfer.model_runner import ModelRunner, StepHandle, enable_compilation_cache
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.quantization.on_load import check_mode
from jaxinfer.quantization.runtime import prepare_packed_weights
from jaxinfer.registry import DEFAULT_MODEL
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxinfer.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from jaxinfer.tokenizer import OutputDetokenizer, load_tokenizer

_NO_SAMPLE = SamplingParams(temperature=0.0)  # rows of prefill chunks that don't sample yet
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429 / gRPC RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class EngineArgs:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None          # default: the model's own
    dtype: str | None = None              # activations; None: float32 on CPU, bfloat16 on GPU/TPU
    weight_dtype: str | None = None       # stored float weights; None: bfloat16, or on CPU the faster of bf16/f32
    #                                       here. Given explicitly, packed checkpoints are expanded to it too
    #                                       unless `quantization` says otherwise.
    quantization: str | None = None       # packed weights: None keeps a checkpoint's packing (GGUF Q4_0/Q4_1/Q8_0,
    #                                       GPTQ, AWQ) where it runs at least as fast as float here (always on
    #                                       GPU); "packed" always; "dequantize" expands it to float; "int8"
    #                                       (per channel) / "int4" (g128, or "int4-g64"...) quantize on load
    kv_cache_dtype: str | None = None     # None: same as dtype
    block_size: int = 16
    num_kv_blocks: int | None = None      # overrides the memory budget below
    kv_cache_memory_gb: float | None = None  # default: 2 GiB on CPU, kv_cache_memory_fraction of free HBM
    kv_cache_memory_fraction: float = 0.9
    max_model_len: int | None = None      # default: min(model context, 2048)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduler_policy: str = "continuous"  # "static": admit a batch only when the previous one finished
    async_scheduling: bool = True         # launch step N+1 before reading step N's tokens (see step())
    attention_backend: str | None = None  # None: "pallas" on GPU, "xla" elsewhere
    matmul_backend: str | None = None     # packed weights: None: "pallas" on GPU, "xla" elsewhere
    compilation_cache_dir: str | None = None
    max_waiting_requests: int = 4096
    verbose: bool = True


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    seqs: list[Sequence]
    detoks: list[OutputDetokenizer]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    prompt_logprobs: list | None = None


@dataclasses.dataclass
class _LaunchedStep:
    sched: SchedulerOutput
    handle: StepHandle
    targets: list[list[int]]    # per scheduled sequence: prompt_logprobs targets (-1 = none)
    sample_rows: dict[int, int]  # seq_id -> its row of the sampler output, for sequences that sample


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        args = dataclasses.replace(args or EngineArgs(), **kwargs)
        self.args = args
        enable_compilation_cache(args.compilation_cache_dir)
        backend = jax.default_backend()
        dtype = _DTYPES[args.dtype or ("float32" if backend == "cpu" else "bfloat16")]
        kv_dtype = _DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else dtype
        checkpoint = open_checkpoint(args.model)
        self.config = checkpoint.config
        weight_dtype = _DTYPES[args.weight_dtype or self._default_weight_dtype(backend)]
        # The embedding and LM head are kept at the activation precision when it is wider than the weights'
        # (f32 with bf16 weights, the CPU default): `layers.linear` rounds its input to the weight dtype, and at
        # the LM head, and with tied embeddings at the lookup, bf16 flips close calls between the top tokens
        # (SmolLM2-135M then answers "What is the capital of France?" with "L'Étoile, la Marseillaise, ..." where
        # HF fp32 says "The capital of France is Paris."). It is one matrix, 0.06 GiB more for SmolLM2.
        head_dtype = max(weight_dtype, dtype, key=lambda d: jnp.dtype(d).itemsize)
        quantization = check_mode(args.quantization)
        params = load_params(checkpoint, weight_dtype, head_dtype=head_dtype, verbose=args.verbose,
                             quantization="dequantize" if quantization is None and args.weight_dtype else quantization)
        packed = prepare_packed_weights(self.config, params, backend=backend, quantization=quantization,
                                        matmul_backend=args.matmul_backend, float_dtype=weight_dtype,
                                        head_dtype=head_dtype)
        params = packed.params
        self.params_nbytes = params_nbytes(params)  # what the device holds for the weights
        if args.verbose and packed.note:
            print(f"[jaxinfer] {packed.note}; weights hold {self.params_nbytes / 2**30:.3f} GiB", flush=True)
        path = checkpoint.path
        tokenizer_source = args.tokenizer or (None if path.startswith("random:") else path)  # random weights: none
        self.tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None
        self.eos_token_ids = set(self.config.eos_token_ids) | (self.tokenizer.eos_token_ids if self.tokenizer else set())
        self.max_model_len = min(args.max_model_len or min(self.config.max_position_embeddings, 2048),
                                 self.config.max_position_embeddings)
        num_blocks = self._num_kv_blocks(kv_dtype, params)
        if args.verbose:
            gib = num_blocks * args.block_size * self.config.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize) / 2**30
            print(f"[jaxinfer] KV cache: {num_blocks} blocks x {args.block_size} tokens = "
                  f"{num_blocks * args.block_size} tokens, {gib:.2f} GiB ({jnp.dtype(kv_dtype).name}) on {backend}",
                  flush=True)
        self.runner = ModelRunner(
            self.config, params, num_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len, kv_dtype=kv_dtype,
            attention_backend=args.attention_backend or default_attention_backend(),
            matmul_backend=packed.matmul_backend, quant_plan=packed.plan, compiler_options=packed.compiler_options,
            dtype=dtype)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
            policy=args.scheduler_policy))
        self._requests: dict[str, _Request] = {}
        self._inflight: _LaunchedStep | None = None  # async scheduling: the step whose results are unread
        self._static_rows = 0  # static policy: rows the current batch keeps until it finishes
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._stats = {"num_requests": 0, "num_generated_tokens": 0, "num_prompt_tokens": 0}

    def _default_weight_dtype(self, backend: str) -> str:
        """bfloat16 on accelerators; on CPU whichever of bf16 and f32 this machine runs faster (measured once
        per machine and cached: cpu_probe.py), since that depends on the CPU's vector extensions."""
        if backend != "cpu":
            return "bfloat16"
        from jaxinfer.cpu_probe import choose_weight_dtype

        choice = choose_weight_dtype(self.config)
        if self.args.verbose:
            print(f"[jaxinfer] weight dtype {choice.dtype}: {choice.reason}"
                  f"{' (cached measurement)' if choice.cached else ''}; weight_dtype= overrides", flush=True)
        return choice.dtype

    def _num_kv_blocks(self, kv_dtype, params) -> int:
        a = self.args
        if a.num_kv_blocks:
            return a.num_kv_blocks
        bytes_per_block = a.block_size * self.config.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize)
        if a.kv_cache_memory_gb is not None:
            budget = a.kv_cache_memory_gb * 2**30
        else:
            stats = jax.devices()[0].memory_stats() or {}
            if "bytes_limit" in stats:  # GPU/TPU: a fraction of what the weights leave free
                budget = (stats["bytes_limit"] * a.kv_cache_memory_fraction - stats.get("bytes_in_use", 0))
            else:
                budget = 2 * 2**30
        need = math.ceil(self.max_model_len / a.block_size)
        return max(int(budget // bytes_per_block), need)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None) -> str:
        """Validate and queue a request. Raises ValueError (bad input) or QueueFullError before anything is
        queued, so a rejected request never disturbs the others."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, (list, tuple)) and prompt_token_ids is None:
            prompt, prompt_token_ids = None, list(prompt)
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt is empty")
        if any(t < 0 or t >= self.config.vocab_size for t in ids):
            raise ValueError(f"prompt_token_ids must be in [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than fits max_model_len={self.max_model_len} "
                             "with at least one generated token")
        if params.n > min(self.args.max_num_seqs, self.args.max_num_batched_tokens):
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.args.max_num_seqs} "
                             f"or max_num_batched_tokens={self.args.max_num_batched_tokens}")
        if self.scheduler.num_waiting >= self.args.max_waiting_requests:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are waiting "
                                 f"(max_waiting_requests={self.args.max_waiting_requests}); retry later")
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")

        seed = sampler.new_request_seed()
        seqs = [Sequence(next(self._seq_ids), request_id, ids, params, group_id=0 if params.n > 1 else None,
                         skip_prefix_cache=params.prompt_logprobs is not None,  # as vLLM: every position computed
                         max_output_tokens=params.max_tokens)
                for _ in range(params.n)]
        detoks = [OutputDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens, prompt_ids=ids)
                  if self.tokenizer else None for _ in seqs]
        outputs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        req = _Request(request_id, prompt, ids, params, seed, seqs, detoks, outputs,
                       RequestMetrics(arrival_time=time.monotonic()),
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self._requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        self._stats["num_requests"] += 1
        self._stats["num_prompt_tokens"] += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now (client gone or cancelled); its KV blocks are freed immediately."""
        req = self._requests.pop(request_id, None)
        self.scheduler.abort(request_id)
        if req:
            for out in req.outputs:
                out.finish_reason = out.finish_reason or "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one model step; return the outputs of the requests that got tokens.

        With async scheduling the step is launched before the previous one's results are read, so host work
        (reading results, detokenizing, stop checks, scheduling the next step) overlaps device work, and the
        outputs returned are those of the previous step."""
        outputs = []
        previous, self._inflight = self._inflight, None
        launched = self._launch(previous)
        if previous is not None:
            outputs = self._complete(previous)  # while the device runs `launched`
        if launched is not None:
            pending = {s.seq.seq_id: PENDING_TOKEN for s in launched.sched.scheduled if s.samples}
            self.scheduler.on_step_done(launched.sched, pending)
            if self.args.async_scheduling:
                self._inflight = launched
            else:
                outputs = self._complete(launched)
        return outputs

    def _launch(self, previous: _LaunchedStep | None) -> _LaunchedStep | None:
        new_batch = self.scheduler.num_running == 0
        sched = self.scheduler.schedule()
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
        for s in sched.scheduled:
            seq, req = s.seq, self._requests[s.seq.request_id]
            tokens = seq.all_token_ids
            chunk = tokens[s.start:s.start + s.num_new_tokens]
            pending_row = previous_rows[seq.seq_id] if chunk[-1] == PENDING_TOKEN else -1
            chunks.append(SeqChunk(chunk, s.start, s.block_table, pending_row))
            index = req.seqs.index(seq)
            rows.append(sampler.RowInfo(params=req.params, seed=sampler.row_seed(req.params, req.seed, index),
                                        step=len(seq.output_token_ids), prompt_token_ids=seq.prompt_token_ids,
                                        output_token_ids=seq.output_token_ids, pending_row=pending_row)
                        if s.samples else sampler.RowInfo(params=_NO_SAMPLE, seed=0, step=0))
            # Entry j of prompt_logprobs is for prompt token j; positions recomputed after a preemption already
            # have theirs.
            wants_prompt_logprobs = req.prompt_logprobs is not None and index == 0
            have = len(req.prompt_logprobs) if wants_prompt_logprobs else seq.num_prompt_tokens
            targets.append([tokens[p + 1] if have <= p + 1 < seq.num_prompt_tokens else -1
                            for p in range(s.start, s.start + s.num_new_tokens)])
            need_prompt_logprobs |= any(t >= 0 for t in targets[-1])
        handle = self.runner.launch(chunks, rows, targets if need_prompt_logprobs else None,
                                    min_tokens=self._static_rows, previous=previous and previous.handle)
        sample_rows = {s.seq.seq_id: i for i, s in enumerate(sched.scheduled) if s.samples}
        return _LaunchedStep(sched, handle, targets, sample_rows)

    def _complete(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step, write its sampled tokens into their sequences and process them."""
        result, prompt_lp = self.runner.fetch(step.handle)
        touched: dict[str, _Request] = {}
        offsets = np.cumsum([0] + [s.num_new_tokens for s in step.sched.scheduled])
        for i, s in enumerate(step.sched.scheduled):
            req = self._requests.get(s.seq.request_id)
            if req is None or s.seq.is_finished:
                continue  # aborted, or stopped on an earlier token while this step ran: its row is dropped
            if prompt_lp is not None and any(t >= 0 for t in step.targets[i]):
                self._add_prompt_logprobs(req, prompt_lp, int(offsets[i]), step.targets[i])
            if s.samples:
                s.seq.resolve_pending_token(int(result.token_ids[i]))
                self._append_token(req, s.seq, result, i)
                touched[req.request_id] = req
        return [self._make_output(req) for req in touched.values()]

    def _append_token(self, req: _Request, seq: Sequence, result, row: int) -> None:
        index = req.seqs.index(seq)
        out, detok, p = req.outputs[index], req.detoks[index], req.params
        token = seq.output_token_ids[-1]
        now = time.monotonic()
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        self._stats["num_generated_tokens"] += 1
        out.token_ids.append(token)
        out.delta_token_ids.append(token)
        if out.logprobs is not None:
            entry = {int(t): float(lp) for t, lp in zip(result.top_ids[row][:p.logprobs], result.top_logprobs[row])}
            entry[token] = float(result.logprob[row])
            out.logprobs.append(entry)
        finish, stop_reason = None, None
        if detok is not None:
            d = detok.add(token)
            out.delta_text += d.delta
            if d.stopped:
                finish, stop_reason = "stop", d.stop_str
        if finish is None:
            if token in self.eos_token_ids and not p.ignore_eos:
                finish = "stop"
            elif token in p.stop_token_ids:
                finish, stop_reason = "stop", token
            elif (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) \
                    or seq.num_tokens >= self.max_model_len:
                finish = "length"
            if finish and detok is not None:
                out.delta_text += detok.finish()
        if detok is not None:
            out.text = detok.text
        if finish:
            out.finish_reason, out.stop_reason = finish, stop_reason
            status = SequenceStatus.FINISHED_STOPPED if finish == "stop" else SequenceStatus.FINISHED_LENGTH_CAPPED
            self.scheduler.finish(seq.seq_id, status)
            if all(o.finish_reason for o in req.outputs):
                req.metrics.finished_time = now

    def _add_prompt_logprobs(self, req: _Request, prompt_lp, offset: int, targets: list[int]) -> None:
        target_lp, top_ids, top_lp = prompt_lp
        k = req.params.prompt_logprobs
        for j, t in enumerate(targets):
            if t < 0:
                continue
            entry = {int(i): float(lp) for i, lp in zip(top_ids[offset + j][:k], top_lp[offset + j][:k])}
            entry[t] = float(target_lp[offset + j])
            req.prompt_logprobs.append(entry)

    def _make_output(self, req: _Request) -> RequestOutput:
        finished = all(o.finish_reason for o in req.outputs)
        if finished:
            self._requests.pop(req.request_id, None)
        outputs = [o.snapshot() for o in req.outputs]
        for o in req.outputs:
            o.delta_text, o.delta_token_ids = "", []
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             dataclasses.replace(req.metrics), req.prompt_logprobs)

    # ------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        m = dict(self.scheduler.metrics())
        m.update(self._stats, num_compiled_step_variants=self.runner.num_compiled(), weight_bytes=self.params_nbytes)
        return m

    def warmup(self, param_variants=None, token_counts=None) -> float:
        """Precompile every token bucket (greedy and random sampling by default), or only the buckets that steps
        of these token counts use (a one-shot run that knows its prompt)."""
        variants = param_variants or [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
        return self.runner.warmup(variants, token_counts)
