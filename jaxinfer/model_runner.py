"""Model runner: owns the weights, the paged KV cache and the jitted step.

Host side it packs scheduled chunks into a `StepBatch` of bucketed shape (token count T from a small fixed
set; S = min(T, max_num_seqs) sequence rows), so the step compiles once per bucket. The KV cache is donated to
every call and updated in place; only sampled token ids (and logprobs when asked) come back to the host.

`launch` dispatches a step and returns at once (JAX dispatch is asynchronous); `fetch` waits for its results.
Between the two the engine does host work while the device computes, and may launch the next step, whose
decode tokens are read on device from this step's sampled ids (`StepHandle.padded_token_ids`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer import sampler
from jaxinfer.attention import DEFAULT_CHUNK_BLOCKS
from jaxinfer.batch import SeqChunk, build_step_batch, bucket
from jaxinfer.config import ModelConfig
from jaxinfer.model import LlamaModel, init_kv_cache
from jaxinfer.quantization.weight import packing_of


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
                 matmul_backend: str, dtype, quant_plan=None, compiler_options: dict | None = None):
        self.config = config
        self.params = params
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_num_batched_tokens, max_num_seqs)
        blocks = math.ceil(max_model_len / block_size)
        self.max_blocks = math.ceil(blocks / DEFAULT_CHUNK_BLOCKS) * DEFAULT_CHUNK_BLOCKS
        self.kv_cache = init_kv_cache(config, num_blocks, block_size, kv_dtype, attention_backend)
        self.model = LlamaModel(config, dtype=dtype, attention_backend=attention_backend,
                                matmul_backend=matmul_backend, packing=packing_of(params), quant_plan=quant_plan)
        self.eos_token_ids = tuple(config.eos_token_ids)
        # Forward and sampler are separate jits: the forward compiles once per token bucket whatever sampling
        # options are in the batch; the sampler's variants are small and compile in a fraction of the time.
        # compiler_options: XLA options for the forward (packed weights on CPU: jaxinfer.quantization.xla_matmul)
        self._forward = jax.jit(self._forward_impl, donate_argnums=(1,), compiler_options=compiler_options or None)
        self._sample = jax.jit(self._sample_impl, static_argnames=("flags", "eos_token_ids"))
        self.max_rows = self.num_rows(self.buckets[-1])
        self._no_prev_tokens = jnp.zeros(self.max_rows, jnp.int32)
        self._copy = jax.jit(_copy_blocks, donate_argnums=(0,))

    def num_rows(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    # ------------------------------------------------------------------------------------------ device side
    def _forward_impl(self, params, kv_cache, batch, prompt_targets, prev_token_ids):
        """Logits of each sequence's last token [S, V]. With prompt_targets ([T], -1 = none) it also returns,
        for every token, the log-prob of the next prompt token and the top-20 (prompt_logprobs).
        prev_token_ids: the previous step's sampled ids, which tokens with batch.prev_sample_rows >= 0 take."""
        rows = batch.prev_sample_rows
        batch = batch.replace(token_ids=jnp.where(rows >= 0, prev_token_ids[jnp.maximum(rows, 0)], batch.token_ids))
        want_all = prompt_targets is not None
        logits, kv_cache = self.model.apply({"params": params}, kv_cache, batch, all_logits=want_all)
        prompt_lp = None
        if want_all:
            logp = jax.nn.log_softmax(logits, axis=-1)
            target_lp = jnp.take_along_axis(logp, jnp.maximum(prompt_targets, 0)[:, None], axis=1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(logp, 20)
            prompt_lp = (target_lp, top_ids, top_lp)
            logits = logits[batch.logits_indices]
        return (logits, prompt_lp), kv_cache

    def _sample_impl(self, logits, tensors, prev_token_ids, flags, eos_token_ids):
        out = sampler.sample(logits, tensors, flags=flags, eos_token_ids=eos_token_ids,
                             prev_token_ids=prev_token_ids)
        padded = jnp.zeros(self.max_rows, jnp.int32).at[:out.token_ids.shape[0]].set(out.token_ids)
        return out, padded

    # -------------------------------------------------------------------------------------------- host side
    def prepare(self, chunks: list[SeqChunk], min_tokens: int = 0):
        num_tokens = bucket(max(sum(len(c.token_ids) for c in chunks), min_tokens), self.buckets)
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
        prev_tokens = previous.padded_token_ids if previous is not None else self._no_prev_tokens
        built = time.perf_counter()
        (logits, prompt_lp), self.kv_cache = self._forward(self.params, self.kv_cache, batch, targets, prev_tokens)
        out, padded = self._sample(logits, tensors, prev_tokens, flags=flags, eos_token_ids=self.eos_token_ids)
        dispatched = time.perf_counter()
        for leaf in jax.tree_util.tree_leaves((out, prompt_lp)):
            leaf.copy_to_host_async()  # start the (small) copy back now, not when the host asks
        return StepHandle(out, prompt_lp, padded, batch.num_tokens, built - start, dispatched - built)

    @staticmethod
    def fetch(handle: StepHandle):
        """Wait for a launched step: (SamplerOutput, prompt logprobs or None) as numpy arrays."""
        return jax.device_get((handle.sampled, handle.prompt_logprobs))

    def copy_blocks(self, pairs: list[tuple[int, int]]):
        """Copy-on-write: duplicate whole blocks (all layers) before the step that writes them."""
        if not pairs:
            return
        n = 1 << (len(pairs) - 1).bit_length()  # bucket the count; padding repeats the first copy (idempotent)
        padded = list(pairs) + [pairs[0]] * (n - len(pairs))
        src, dst = (np.asarray(col, np.int32) for col in zip(*padded))
        self.kv_cache = self._copy(self.kv_cache, src, dst)

    def warmup(self, param_variants, token_counts=None) -> float:
        """Compile the forward for every token bucket, and the sampler for each bucket and sampling variant
        (given as SamplingParams), so serving never compiles. `token_counts` limits it to their buckets."""
        start = time.perf_counter()
        buckets = sorted({bucket(n, self.buckets) for n in token_counts}) if token_counts else self.buckets
        jobs = [(t, p) for t in buckets for p in param_variants]
        for num_tokens, params in tqdm(jobs, desc="compiling step buckets", unit="bucket"):
            # A batch of padding only: it writes nothing to the cache.
            batch = build_step_batch([], num_tokens=num_tokens, num_seqs=self.num_rows(num_tokens),
                                     max_blocks=self.max_blocks, block_size=self.block_size,
                                     num_blocks=self.num_blocks)
            rows = [sampler.RowInfo(params=params, seed=0, step=0, prompt_token_ids=[0], output_token_ids=[])]
            tensors, flags = sampler.make_sampling_tensors(rows, self.num_rows(num_tokens), self.config.vocab_size)
            (logits, _), self.kv_cache = self._forward(self.params, self.kv_cache, batch, None,
                                                       self._no_prev_tokens)
            jax.block_until_ready(self._sample(logits, tensors, self._no_prev_tokens, flags=flags,
                                               eos_token_ids=self.eos_token_ids))
        n = 1
        while n <= self.max_num_seqs:  # copy-on-write block copies, bucketed by count
            self.copy_blocks([(0, 0)] * n)
            n *= 2
        return time.perf_counter() - start

    def num_compiled(self) -> int:
        """Compiled executables (forward, sampler variants, block copies): constant after warm-up."""
        return self._forward._cache_size() + self._sample._cache_size() + self._copy._cache_size()


def _copy_blocks(kv_cache, src, dst):
    return tuple((k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])) for k, v in kv_cache)
