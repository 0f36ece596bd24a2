"""Baselines for the throughput benchmark, run on exactly the workload jaxinfer runs.

(a) HF transformers `generate` with static batching: padded (left) batches of 16 in arrival order; each
    batch runs until its longest request is done, fp32, greedy, 2 torch threads. Only each request's own
    requested tokens count as useful output.
(b) llama.cpp (llama-cpp-python) on the same GGUF, 2 threads: single-stream prefill/decode speed, and the
    workload either batched (many sequences per `llama_decode`, continuous admission, like llama.cpp's
    server) or sequentially, one request after another.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from benchmarks.workload import Workload


@dataclasses.dataclass
class ThroughputResult:
    system: str
    runs_wall_s: list[float]           # wall time of each run over the whole workload
    useful_output_tokens: int          # sum of the requested output lengths
    prompt_tokens: int
    outputs: list[list[int]] | None = None  # generated ids per request (from the last run), for agreement checks
    notes: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.runs_wall_s)

    @property
    def useful_tok_s(self) -> float:
        return self.useful_output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.useful_output_tokens) / self.wall_s


@dataclasses.dataclass
class SingleStreamResult:
    system: str
    prompt_len: int
    decode_tokens: int
    ttft_s: float          # prompt in -> first generated token out (median over runs)
    decode_tok_s: float    # generated tokens after the first / time after the first (median over runs)
    notes: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.ttft_s


def timed_runs(fn: Callable[[], list[list[int]]], runs: int) -> tuple[list[float], list[list[int]]]:
    """Calls fn `runs` times; returns the wall time of each call and the last call's outputs."""
    walls, outputs = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        outputs = fn()
        walls.append(time.perf_counter() - t0)
    return walls, outputs


# ------------------------------------------------------------------------------------ HF transformers

def load_hf_model(model_path: str, threads: int = 2):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32)
    return model.eval()


def _hf_generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int):
    """Left-padded greedy generate of exactly `max_new_tokens` tokens for every row (EOS is masked out
    until then via min_new_tokens). Returns the generated ids, [batch, max_new_tokens]."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
    return out[:, width:]


def run_hf_static(workload: Workload, model_path: str, batch_size: int = 16, threads: int = 2,
                  runs: int = 1) -> ThroughputResult:
    model = load_hf_model(model_path, threads)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    _hf_generate_batch(model, [workload.prompts[0][:16]] * 2, 4, pad_id)  # warm-up, not timed

    def run_once() -> list[list[int]]:
        outputs = []
        for start in range(0, len(workload), batch_size):
            batch = workload.requests[start:start + batch_size]
            longest = max(r.output_len for r in batch)
            generated = _hf_generate_batch(model, [r.prompt_token_ids for r in batch], longest, pad_id)
            outputs += [generated[i, :r.output_len].tolist() for i, r in enumerate(batch)]
        return outputs

    walls, outputs = timed_runs(run_once, runs)
    computed = sum(max(r.output_len for r in workload.requests[s:s + batch_size]) * len(
        workload.requests[s:s + batch_size]) for s in range(0, len(workload), batch_size))
    del model
    gc.collect()
    return ThroughputResult(
        system=f"HF transformers static (batch {batch_size})", runs_wall_s=walls,
        useful_output_tokens=workload.num_output_tokens, prompt_tokens=workload.num_prompt_tokens,
        outputs=outputs,
        notes=f"generated {computed} output tokens, {workload.num_output_tokens / computed:.0%} of them useful",
        extra={"computed_output_tokens": computed})


# ------------------------------------------------------------------------------------------- llama.cpp

_SILENCE_LLAMA_LOG = None  # keeps the ctypes log callback alive


class LlamaCpp:
    """A llama.cpp model + context through llama-cpp-python's low-level (C API) bindings.

    Greedy decoding of many sequences at once: `run_workload` is a small continuous-batching loop in the
    style of llama.cpp's server: up to `n_parallel` sequences are live; each `llama_decode` call carries
    one token of every decoding sequence plus as many pending prompt tokens as fit in `n_batch`; a
    finished sequence's KV is dropped and the next request is admitted. With n_parallel=1 it runs the
    requests sequentially.
    """

    def __init__(self, model_path: str, n_parallel: int, max_seq_len: int, threads: int = 2,
                 n_batch: int = 512, kv_unified: bool = False):
        import llama_cpp

        global _SILENCE_LLAMA_LOG
        self.lib = llama_cpp
        if _SILENCE_LLAMA_LOG is None:
            _SILENCE_LLAMA_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            llama_cpp.llama_log_set(_SILENCE_LLAMA_LOG, ctypes.c_void_p())
            llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = n_parallel
        # Without kv_unified every sequence gets its own n_ctx / n_seq_max slots.
        cparams.n_ctx = n_parallel * max_seq_len
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = kv_unified
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_parallel, self.n_batch = n_parallel, n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.kv_desc = f"n_ctx {cparams.n_ctx}, kv_unified {kv_unified}, n_batch {n_batch}, {threads} threads"

    def close(self):
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def clear(self):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, seq_id, wants_logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, batch_index: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, batch_index)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def run_workload(self, workload: Workload) -> list[list[int]]:
        self.clear()
        requests = workload.requests
        outputs: list[list[int]] = [[] for _ in requests]
        next_request = 0
        free_slots = list(range(self.n_parallel))[::-1]
        live: dict[int, dict] = {}  # seq_id -> {"req", "prefilled", "last"}
        while next_request < len(requests) or live:
            while free_slots and next_request < len(requests):
                live[free_slots.pop()] = {"req": next_request, "prefilled": 0, "last": None}
                next_request += 1
            entries, samples = [], []  # samples: (seq_id, index in batch)
            for seq, s in live.items():  # decodes first: one token each
                if s["last"] is not None:
                    pos = requests[s["req"]].prompt_len + len(outputs[s["req"]]) - 1
                    samples.append((seq, len(entries)))
                    entries.append((s["last"], pos, seq, True))
            for seq, s in live.items():  # then prompt chunks, while the batch has room
                prompt = requests[s["req"]].prompt_token_ids
                while s["prefilled"] < len(prompt) and len(entries) < self.n_batch:
                    last = s["prefilled"] == len(prompt) - 1
                    if last:
                        samples.append((seq, len(entries)))
                    entries.append((prompt[s["prefilled"]], s["prefilled"], seq, last))
                    s["prefilled"] += 1
            self._decode(entries)
            for seq, index in samples:
                s = live[seq]
                token = self._argmax(index)
                out = outputs[s["req"]]
                out.append(token)
                s["last"] = token
                if len(out) == requests[s["req"]].output_len:
                    self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq, -1, -1)
                    del live[seq]
                    free_slots.append(seq)
        return outputs

    def single_stream(self, prompt: Sequence[int], decode_tokens: int) -> tuple[float, float]:
        """Returns (time to first token, decode tok/s over the tokens after the first)."""
        self.clear()
        t0 = time.perf_counter()
        self._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        token = self._argmax(len(prompt) - 1)
        t1 = time.perf_counter()
        for i in range(decode_tokens - 1):
            self._decode([(token, len(prompt) + i, 0, True)])
            token = self._argmax(0)
        t2 = time.perf_counter()
        return t1 - t0, (decode_tokens - 1) / (t2 - t1)


def run_llamacpp(workload: Workload, model_path: str, mode: str = "batched", n_parallel: int = 32,
                 threads: int = 2, runs: int = 1) -> ThroughputResult:
    """mode "batched": continuous batching of up to n_parallel sequences; "sequential": one at a time."""
    if mode not in ("batched", "sequential"):
        raise ValueError(f"unknown llama.cpp mode {mode!r}")
    n_parallel = n_parallel if mode == "batched" else 1
    n_batch = 512 if mode == "batched" else 256
    llm = LlamaCpp(model_path, n_parallel, workload.max_total_len, threads, n_batch=n_batch)
    try:
        warm = Workload(tuple(dataclasses.replace(r, output_len=4) for r in workload.requests[:2]), workload.seed)
        llm.run_workload(warm)  # warm-up, not timed
        walls, outputs = timed_runs(lambda: llm.run_workload(workload), runs)
        desc = llm.kv_desc
    finally:
        llm.close()
    label = f"llama.cpp batched (≤{n_parallel} seqs)" if mode == "batched" else "llama.cpp sequential"
    return ThroughputResult(system=label, runs_wall_s=walls, useful_output_tokens=workload.num_output_tokens,
                            prompt_tokens=workload.num_prompt_tokens, outputs=outputs,
                            notes=f"Q4_1 weights, {desc}")


def llamacpp_single_stream(model_path: str, prompt: Sequence[int], decode_tokens: int = 128,
                           threads: int = 2, runs: int = 3) -> SingleStreamResult:
    llm = LlamaCpp(model_path, 1, len(prompt) + decode_tokens, threads, n_batch=max(256, len(prompt)))
    try:
        llm.single_stream(prompt, 8)  # warm-up
        results = [llm.single_stream(prompt, decode_tokens) for _ in range(runs)]
    finally:
        llm.close()
    return SingleStreamResult(
        system="llama.cpp", prompt_len=len(prompt), decode_tokens=decode_tokens,
        ttft_s=statistics.median(r[0] for r in results), decode_tok_s=statistics.median(r[1] for r in results),
        notes=f"Q4_1 weights, {threads} threads, median of {runs}")
