"""Model runner: owns the weights, the paged KV cache and the jitted step.

Host side it packs scheduled chunks into a `StepBatch` of bucketed shape (token count T from a small fixed
set; S = min(T, max_num_seqs) sequence rows), so the step compiles once per bucket. The KV cache is donated to
every call and updated in place; only sampled token ids (and logprobs when asked) come back to the host.

`launch` dispatches a step and returns at once (JAX dispatch is asynchronous); `fetch` waits for its results.
Between the two the engine does host work while the device computes, and may launch the next step, whose
decode tokens are read on device from this step's sampled ids (`StepHandle.padded_token_ids`).

With a `ShardingPlan` (tensor / pipeline parallelism) the forward, the sampler and the block copies each run as
one SPMD program over the plan's mesh (`shard_map`): every device runs the model on its own shard of the weights
and KV pages, with the collectives the model and the sampler name (docs/PARALLELISM.md). The host side is
unchanged but for pipeline micro-batches (`pipeline.build_pipeline_batch`). In a multi-process run, process 0's
runner sends every device call's host inputs to the other processes (`channel`), which make the same calls.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import threading
import time
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer import sampler
from jaxinfer.attention import DEFAULT_CHUNK_BLOCKS, keys_transposed
from jaxinfer.batch import SeqChunk, build_step_batch, bucket
from jaxinfer.config import ModelConfig
from jaxinfer.executable_cache import ExecutableCache, ExecutableRecord, abstract
from jaxinfer.model import LlamaModel, ShardAxes, init_kv_cache
from jaxinfer.pipeline import PipelineBatch, build_pipeline_batch, pipeline_forward
from jaxinfer.quantization.weight import packing_of
from jaxinfer.sharding import ShardingPlan
from jaxinfer.vocab_parallel import VocabShard

log = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int, max_num_seqs: int = 0) -> tuple[int, ...]:
    """Token-count buckets: 2, 4, 8, 16, then quarter steps (20, 24, 28, 32, 40, ...) up to max_num_seqs, where
    decode-only steps live, and half steps (96, 128, 192, ...) above it, up to and including
    max_num_batched_tokens. A CPU step costs about its row count, so padding rows cost real time; quarter steps cap
    it at a fifth of a decode step. The small buckets keep single-stream decode from paying for 8 rows of matmul.
    No bucket of 1: XLA CPU turns a one-row KV scatter into a select over the whole cache (measured: 2.4 s a
    step with a 2 GiB cache)."""
    out, b = [], 2
    while b < max_num_batched_tokens:
        out.append(b)
        if b >= 16:
            step = b // 4 if b < max_num_seqs else b // 2
            out.extend(x for x in range(b + step, 2 * b, step) if x < max_num_batched_tokens)
        b *= 2
    out.append(max_num_batched_tokens)
    return tuple(out)


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (on by default; JAXINFER_COMPILATION_CACHE='' disables it)."""
    path = os.environ.get("JAXINFER_COMPILATION_CACHE", path or os.path.expanduser("~/.cache/jaxinfer/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


_BACKGROUND_WARMUPS: "weakref.WeakSet[ModelRunner]" = weakref.WeakSet()


@atexit.register
def _stop_background_warmups() -> None:
    """A daemon thread stopped inside XLA (compiling or deserialising) at interpreter exit aborts the process
    ("terminate called ... exception not rethrown"); let each one finish the executable it is on first."""
    for runner in list(_BACKGROUND_WARMUPS):
        runner.stop_warmup()


@dataclasses.dataclass
class StepHandle:
    """A launched step: device arrays, possibly not computed yet, and what launching it cost the host."""
    sampled: sampler.SamplerOutput
    prompt_logprobs: tuple | None
    padded_token_ids: jax.Array  # [max rows] int32: the sampled ids, padded to one shape for the next step
    num_tokens: int = 0  # the token bucket it runs at
    build_s: float = 0.0  # host time building the batch and sampling tensors
    dispatch_s: float = 0.0  # host time in the jitted calls (dispatch only: they return before the device ends)


class ModelRunner:
    def __init__(self, config: ModelConfig, params, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, kv_dtype, attention_backend: str,
                 matmul_backend: str, dtype, plan: ShardingPlan | None = None, num_microbatches: int | None = None,
                 channel=None, quant_plan=None, compiler_options: dict | None = None,
                 executable_cache_dir: str | None = None):
        """plan: lay the model out on a mesh (params must be placed by it: `plan.place` / `plan.shard_params`).
        num_microbatches: micro-batches per step with pipeline stages (default: one per stage). channel: a
        `distributed.Channel` of a multi-process run; process 0 sends every device call through it.
        quant_plan / compiler_options: how packed weights run (`jaxinfer.quantization.runtime`): the XLA
        formulation per row count and the XLA options the forward compiles with.
        executable_cache_dir: where warm-up keeps compiled executables (executable_cache.py); None: nowhere.
        Only a one-device, one-process runner warms up through it; a mesh or a multi-process run compiles its
        buckets through the jits (`_jit_warmup`), which the followers replay."""
        self.config = config
        self.params = params
        self.plan = plan
        self.channel = channel
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_num_batched_tokens, max_num_seqs)
        blocks = math.ceil(max_model_len / block_size)
        self.max_blocks = math.ceil(blocks / DEFAULT_CHUNK_BLOCKS) * DEFAULT_CHUNK_BLOCKS
        self.pp = plan.pp if plan else 1
        self.num_microbatches = (num_microbatches or self.pp) if self.pp > 1 else 1
        model_config, axes = config, ShardAxes()
        if plan is not None:
            model_config = plan.local_config
            axes = ShardAxes(plan.tensor_axis, plan.vocab_axes,
                             config.vocab_size if plan.padded_vocab != config.vocab_size else 0)
            self.kv_cache = plan.init_kv_cache(num_blocks, block_size, kv_dtype, keys_transposed(attention_backend))
        else:
            self.kv_cache = init_kv_cache(config, num_blocks, block_size, kv_dtype, attention_backend)
        self.vocab = VocabShard(axes.vocab)
        self.model = LlamaModel(model_config, dtype=dtype, attention_backend=attention_backend,
                                matmul_backend=matmul_backend, packing=packing_of(params), axes=axes,
                                quant_plan=quant_plan)
        self.eos_token_ids = tuple(config.eos_token_ids)
        # Forward and sampler are separate jits: the forward compiles once per token bucket whatever sampling
        # options are in the batch; the sampler's variants are small and compile in a fraction of the time.
        self._forward = jax.jit(self._spmd(self._forward_impl), donate_argnums=(1,),
                                compiler_options=compiler_options or None)
        # On a mesh the sampled ids come out replicated, and the "no previous step" ids are placed alike, so both
        # kinds of step input hit the same compiled forward (device_put of host data is valid in multi-process).
        replicated = NamedSharding(plan.mesh, P()) if plan else None
        self._sample = jax.jit(self._sample_impl, static_argnames=("flags", "eos_token_ids"),
                               out_shardings=replicated)
        self.max_rows = self.num_microbatches * self.num_rows(self.buckets[-1])
        self._no_prev_tokens = (jax.device_put(np.zeros(self.max_rows, np.int32), replicated) if plan
                                else jnp.zeros(self.max_rows, jnp.int32))
        self._copy = jax.jit(self._spmd(partial(_copy_blocks, block_axis=2 if self.pp > 1 else 1), copy=True),
                             donate_argnums=(0,))
        self._executables = ExecutableCache(executable_cache_dir, dict(
            config=repr(config), dtype=jnp.dtype(dtype).name, attention_backend=attention_backend,
            matmul_backend=matmul_backend, max_rows=self.max_rows, quant_plan=repr(quant_plan),
            compiler_options=repr(sorted((compiler_options or {}).items()))))
        self._aot: dict[tuple, jax.stages.Compiled] = {}  # ("forward", T) | ("sample", S, flags) | ("copy", n)
        self._planned: set[tuple] = set()  # executables warm-up provides (loaded now or in the background)
        self._ready_buckets: tuple[int, ...] | None = None  # while a background warm-up runs: buckets ready
        self._background: threading.Thread | None = None
        self._stop_background = threading.Event()
        self.warmup_records: list[ExecutableRecord] = []

    def num_rows(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    # ------------------------------------------------------------------------------------------ device side
    def _spmd(self, fn, copy: bool = False):
        """fn as one SPMD program over the plan's mesh: weights and KV pages enter as their shards, batch
        inputs replicated; the forward returns logits split over the vocabulary, replicated prompt logprobs."""
        if self.plan is None:
            return fn
        kv = jax.tree_util.tree_map(lambda _: self.plan.kv_partition_spec(), self.kv_cache)
        if copy:
            in_specs, out_specs = (kv, P(), P()), kv
        else:
            in_specs = (self.plan.param_specs(self.params), kv, P(), P(), P())
            out_specs = ((P(None, self.vocab.axes), P()), kv)
        return jax.shard_map(fn, mesh=self.plan.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _forward_impl(self, params, kv_cache, batch, prompt_targets, prev_token_ids):
        """Logits of each sequence's last token [S, V]. With prompt_targets ([T], -1 = none) it also returns,
        for every token, the log-prob of the next prompt token and the top-20 (prompt_logprobs).
        prev_token_ids: the previous step's sampled ids, which tokens with batch.prev_sample_rows >= 0 take."""
        step = batch.mb if isinstance(batch, PipelineBatch) else batch
        rows = step.prev_sample_rows
        step = step.replace(token_ids=jnp.where(rows >= 0, prev_token_ids[jnp.maximum(rows, 0)], step.token_ids))
        want_all = prompt_targets is not None
        if isinstance(batch, PipelineBatch):
            batch = batch.replace(mb=step)
            logits, kv_cache = pipeline_forward(self.model, self.pp, params, kv_cache, batch, all_logits=want_all)
        else:
            batch = step
            logits, kv_cache = self.model.apply({"params": params}, kv_cache, batch, all_logits=want_all)
        prompt_lp = None
        if want_all:
            prompt_lp = sampler.compute_logprobs(logits, jnp.maximum(prompt_targets, 0), 20, self.vocab)
            logits = logits[batch.logits_indices]
        return (logits, prompt_lp), kv_cache

    def _sample_impl(self, logits, tensors, prev_token_ids, flags, eos_token_ids):
        def sample(logits, tensors, prev_token_ids):
            return sampler.sample(logits, tensors, flags=flags, eos_token_ids=eos_token_ids,
                                  prev_token_ids=prev_token_ids, vocab=self.vocab)

        if self.plan is not None:  # each device samples over its vocabulary slice; ids come out replicated
            sample = jax.shard_map(sample, mesh=self.plan.mesh, in_specs=(P(None, self.vocab.axes), P(), P()),
                                   out_specs=P(), check_vma=False)
        out = sample(logits, tensors, prev_token_ids)
        padded = jnp.zeros(self.max_rows, jnp.int32).at[:out.token_ids.shape[0]].set(out.token_ids)
        return out, padded

    # -------------------------------------------------------------------------------------------- host side
    def prepare(self, chunks: list[SeqChunk], min_tokens: int = 0):
        if self.pp > 1:
            return build_pipeline_batch(chunks, num_microbatches=self.num_microbatches, buckets=self.buckets,
                                        max_num_seqs=self.max_num_seqs, max_blocks=self.max_blocks,
                                        block_size=self.block_size, num_blocks=self.num_blocks,
                                        min_tokens=min_tokens)
        # While a background warm-up runs, a step takes the smallest bucket already loaded that fits it.
        num_tokens = bucket(max(sum(len(c.token_ids) for c in chunks), min_tokens),
                            self._ready_buckets or self.buckets)
        return build_step_batch(chunks, num_tokens=num_tokens, num_seqs=self.num_rows(num_tokens),
                                max_blocks=self.max_blocks, block_size=self.block_size, num_blocks=self.num_blocks)

    def execute(self, chunks: list[SeqChunk], rows: list[sampler.RowInfo], prompt_targets=None,
                min_tokens: int = 0):
        """Run one step and wait for it: `fetch(launch(...))`."""
        return self.fetch(self.launch(chunks, rows, prompt_targets, min_tokens))

    def launch(self, chunks: list[SeqChunk], rows: list[sampler.RowInfo], prompt_targets=None,
               min_tokens: int = 0, previous: StepHandle | None = None) -> StepHandle:
        """Dispatch one step without waiting for it; row i of the sampler output belongs to chunks[i].
        prompt_targets: per chunk, the next prompt token of each of its tokens (-1 = none), only when some
        request asked for prompt_logprobs. min_tokens pads the batch to at least that many token rows (static
        batching keeps finished rows as padding). previous: the step whose sampled ids chunks with a
        `pending_row` read."""
        start = time.perf_counter()
        batch = self.prepare(chunks, min_tokens)
        tensors, flags = sampler.make_sampling_tensors(rows, batch.logits_indices.shape[0], self.config.vocab_size)
        targets = None
        if prompt_targets is not None:
            targets = np.full(batch.num_tokens, -1, np.int32)
            flat = [t for chunk_targets in prompt_targets for t in chunk_targets]
            targets[:len(flat)] = flat
        self._send("step", batch, tensors, flags, targets, previous is not None)
        built = time.perf_counter()
        handle = self._step(batch, tensors, flags, targets, previous)
        dispatched = time.perf_counter()
        for leaf in jax.tree_util.tree_leaves((handle.sampled, handle.prompt_logprobs)):
            leaf.copy_to_host_async()  # start the (small) copy back now, not when the host asks
        return dataclasses.replace(handle, build_s=built - start, dispatch_s=dispatched - built)

    def _step(self, batch, tensors, flags, targets, previous: StepHandle | None) -> StepHandle:
        prev_tokens = previous.padded_token_ids if previous is not None else self._no_prev_tokens
        (logits, prompt_lp), self.kv_cache = self._run_forward(batch, targets, prev_tokens)
        out, padded = self._run_sample(logits, tensors, prev_tokens, flags)
        return StepHandle(out, prompt_lp, padded, batch.num_tokens)

    def _send(self, kind: str, *args) -> None:
        if self.channel is not None and self.channel.is_leader:
            self.channel.send((kind, args))

    def follow(self) -> None:
        """A follower process of a multi-process run: make the device calls process 0 sends, in its order,
        until it closes the channel."""
        previous = None
        while True:
            kind, args = self.channel.receive()
            if kind == "stop":
                return
            if kind == "step":
                batch, tensors, flags, targets, use_previous = args
                previous = self._step(batch, tensors, flags, targets, previous if use_previous else None)
            elif kind == "copy":
                self._copy_pairs(*args)
            elif kind == "warmup":
                self._jit_warmup(*args)

    def close(self) -> None:
        """Process 0 of a multi-process run: release the followers."""
        self._send("stop")
        self.channel = None

    @staticmethod
    def fetch(handle: StepHandle):
        """Wait for a launched step: (SamplerOutput, prompt logprobs or None) as numpy arrays."""
        return jax.device_get((handle.sampled, handle.prompt_logprobs))

    def copy_blocks(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: duplicate whole blocks (all layers) before the step that writes them."""
        if not pairs:
            return
        self._send("copy", pairs)
        self._copy_pairs(pairs)

    def _copy_pairs(self, pairs: list[tuple[int, int]]) -> None:
        n = 1 << (len(pairs) - 1).bit_length()  # bucket the count; padding repeats the first copy (idempotent)
        padded = list(pairs) + [pairs[0]] * (n - len(pairs))
        src, dst = (np.asarray(col, np.int32) for col in zip(*padded))
        self.kv_cache = self._aot.get(("copy", n), self._copy)(self.kv_cache, src, dst)

    def _run_forward(self, batch, targets, prev_tokens):
        """The warmed-up executable of this bucket, or the jit (which compiles a shape it has not seen)."""
        compiled = self._aot.get(("forward", batch.num_tokens)) if targets is None else None
        if compiled is not None:
            return compiled(self.params, self.kv_cache, batch, None, prev_tokens)
        return self._forward(self.params, self.kv_cache, batch, targets, prev_tokens)

    def _run_sample(self, logits, tensors, prev_tokens, flags):
        compiled = self._aot.get(("sample", logits.shape[0], flags))
        if compiled is not None:
            return compiled(logits, tensors, prev_tokens)
        return self._sample(logits, tensors, prev_tokens, flags=flags, eos_token_ids=self.eos_token_ids)

    def warmup(self, param_variants, token_counts=None, background: bool = False) -> float:
        """Provide the forward of every token bucket, the sampler of each bucket and sampling variant (given as
        SamplingParams) and the block copies, so serving never compiles: each is loaded from the executable
        cache, or traced, lowered, compiled and stored there (`warmup_records` says which, and the cost). Then
        one padding step per bucket and variant runs each executable once. `token_counts` limits it to the
        buckets those step sizes fall in. background: only the smallest and largest buckets are made ready
        here; the others load (or compile) on a thread while the engine serves, each step taking the smallest
        ready bucket that fits it (`wait_for_warmup` joins the thread). Returns the seconds spent here."""
        if self.plan is not None or self.channel is not None:
            self._send("warmup", param_variants, token_counts)
            return self._jit_warmup(param_variants, token_counts)
        start = time.perf_counter()
        self.wait_for_warmup()
        buckets = sorted({bucket(n, self.buckets) for n in token_counts}) if token_counts else list(self.buckets)
        now = [b for b in buckets if not background or b in (buckets[0], buckets[-1])]
        copies = [1 << i for i in range(max(self.max_num_seqs, 1).bit_length())]  # bucketed block-copy counts
        self._planned.update(("forward", t) for t in buckets)
        self._planned.update(("copy", n) for n in copies)
        jobs = [job for t in now for job in self._bucket_jobs(t, param_variants)] + [self._copy_job(n) for n in copies]
        for job in tqdm(jobs, desc="loading or compiling step executables", unit="executable"):
            self._provide(*job)
        warm_start = time.perf_counter()
        for num_tokens in now:
            self._padding_steps(num_tokens, param_variants)
        for n in copies:
            self.copy_blocks([(0, 0)] * n)
        jax.block_until_ready(self.kv_cache)
        self.warmup_steps_s = time.perf_counter() - warm_start
        later = [(t, self._bucket_jobs(t, param_variants)) for t in buckets if t not in now]
        if later:
            self._ready_buckets = tuple(now)
            self._stop_background.clear()
            _BACKGROUND_WARMUPS.add(self)
            self._background = threading.Thread(target=self._provide_later, args=(later,), daemon=True,
                                                name="jaxinfer-warmup")
            self._background.start()
        return time.perf_counter() - start

    def _jit_warmup(self, param_variants, token_counts=None) -> float:
        """A mesh or multi-process runner: one padding step per bucket and variant through the jits, which compile
        each (JAX's persistent cache serves XLA's part); followers replay it."""
        start = time.perf_counter()
        buckets = sorted({bucket(n, self.buckets) for n in token_counts}) if token_counts else self.buckets
        jobs = [(t, p) for t in buckets for p in param_variants]
        for num_tokens, params in tqdm(jobs, desc="compiling step buckets", unit="bucket"):
            # A batch of padding only: it writes nothing to the cache.
            batch = self.prepare([], min_tokens=num_tokens * self.num_microbatches)
            rows = [sampler.RowInfo(params=params, seed=0, step=0, prompt_token_ids=[0], output_token_ids=[])]
            tensors, flags = sampler.make_sampling_tensors(rows, batch.logits_indices.shape[0],
                                                           self.config.vocab_size)
            jax.block_until_ready(self._step(batch, tensors, flags, None, None).padded_token_ids)
        n = 1
        while n <= self.max_num_seqs:  # copy-on-write block copies, bucketed by count
            self._copy_pairs([(0, 0)] * n)
            n *= 2
        return time.perf_counter() - start

    warmup_steps_s = 0.0  # the padding steps of the last warmup()

    @property
    def warm_buckets(self) -> tuple[int, ...]:
        """Token buckets whose forward warm-up has made ready (loaded or compiled ahead of serving)."""
        return tuple(sorted(key[1] for key in self._aot if key[0] == "forward"))

    @property
    def num_warmup_pending(self) -> int:
        """Planned executables not loaded yet (a background warm-up is still running)."""
        return sum(1 for key in self._planned if key not in self._aot)

    def stop_warmup(self, timeout: float | None = None) -> bool:
        """End a background warm-up after the executable it is on (the rest compile when first used); True when
        none is running any more."""
        self._stop_background.set()
        return self.wait_for_warmup(timeout)

    def wait_for_warmup(self, timeout: float | None = None) -> bool:
        """Join a background warm-up; True when none is running any more."""
        if self._background is not None:
            self._background.join(timeout)
            if self._background.is_alive():
                return False
            self._background = None
        return True

    def _bucket_jobs(self, num_tokens: int, param_variants):
        """(key, name, jitted, abstract args, static args) of one bucket's forward and sampler variants."""
        rows = self.num_rows(num_tokens)
        batch = build_step_batch([], num_tokens=num_tokens, num_seqs=rows, max_blocks=self.max_blocks,
                                 block_size=self.block_size, num_blocks=self.num_blocks)
        prev = abstract(self._no_prev_tokens)
        jobs = [(("forward", num_tokens), f"forward/T={num_tokens}", self._forward,
                 (abstract(self.params), abstract(self.kv_cache), abstract(batch), None, prev), {})]
        logits = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32)  # the forward's f32 logits
        for flags, tensors in {flags: tensors for tensors, flags in
                               (self._dummy_sampling(rows, p) for p in param_variants)}.items():
            self._planned.add(("sample", rows, flags))
            jobs.append((("sample", rows, flags), f"sample/S={rows}/{_flags_name(flags)}", self._sample,
                         (logits, abstract(tensors), prev), dict(flags=flags, eos_token_ids=self.eos_token_ids)))
        return jobs

    def _copy_job(self, n: int):
        pairs = jax.ShapeDtypeStruct((n,), jnp.int32)
        return ("copy", n), f"copy_blocks/n={n}", self._copy, (abstract(self.kv_cache), pairs, pairs), {}

    def _dummy_sampling(self, rows: int, params):
        info = [sampler.RowInfo(params=params, seed=0, step=0, prompt_token_ids=[0], output_token_ids=[])]
        return sampler.make_sampling_tensors(info, rows, self.config.vocab_size)

    def _provide(self, key, name, jitted, args, static):
        if key in self._aot:
            return
        compiled, record = self._executables.get(name, jitted, args, static)
        self.warmup_records.append(record)
        self._aot[key] = compiled

    def _provide_later(self, later):
        try:
            for num_tokens, jobs in later:
                for job in jobs:
                    if self._stop_background.is_set():
                        return
                    self._provide(*job)
                self._ready_buckets = tuple(sorted((*self._ready_buckets, num_tokens)))
        except Exception:  # noqa: BLE001 - the engine keeps serving; unready buckets compile on first use
            log.exception("background warm-up failed; remaining buckets compile when first used")
        finally:
            self._ready_buckets = None

    def _padding_steps(self, num_tokens: int, param_variants):
        # A batch of padding only: it writes nothing to the cache.
        batch = build_step_batch([], num_tokens=num_tokens, num_seqs=self.num_rows(num_tokens),
                                 max_blocks=self.max_blocks, block_size=self.block_size, num_blocks=self.num_blocks)
        (logits, _), self.kv_cache = self._run_forward(batch, None, self._no_prev_tokens)
        for params in param_variants:
            tensors, flags = self._dummy_sampling(self.num_rows(num_tokens), params)
            try:
                jax.block_until_ready(self._run_sample(logits, tensors, self._no_prev_tokens, flags))
            except jax.errors.JaxRuntimeError as e:
                # Seen on XLA CPU: a loaded sampler executable missing a kernel ("Function wrapped_broadcast not
                # found"). The sampler donates nothing, so drop it and let the jit compile this variant.
                log.warning("loaded sampler executable failed (%s); compiling it instead", e)
                self._aot.pop(("sample", self.num_rows(num_tokens), flags), None)
                self._planned.discard(("sample", self.num_rows(num_tokens), flags))
                jax.block_until_ready(self._run_sample(logits, tensors, self._no_prev_tokens, flags))

    def num_compiled(self) -> int:
        """Executables (forward, sampler variants, block copies) warm-up planned, plus those compiled on demand
        since: constant after warm-up unless a step needs a shape or sampling variant it did not provide."""
        return len(self._planned) + self._forward._cache_size() + self._sample._cache_size() \
            + self._copy._cache_size()


def _flags_name(flags: sampler.SamplingFlags) -> str:
    return ",".join(f"{k}={v}" for k, v in flags._asdict().items())


def _copy_blocks(kv_cache, src, dst, block_axis: int = 1):
    """Copy whole blocks src -> dst in every layer's pages ([(stage,) kv heads, blocks, ...])."""
    def copy(pages):
        index = (slice(None),) * block_axis
        return pages.at[index + (dst,)].set(pages[index + (src,)])

    return tuple((copy(k), copy(v)) for k, v in kv_cache)
