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
