"""Perplexity of a model on a text file (`jaxinfer eval ppl`), with HF's sliding-window recipe.

The text is tokenized once (no special tokens) and cut into windows of at most `context` tokens whose starts are
`stride` apart. Each window scores only the tokens the previous window did not (its last `stride` tokens; the
first window all of its tokens but the first, which nothing predicts), each predicted from everything before it
in the window. With stride < context every scored token after the first window sees at least
context - stride tokens of context. PPL = exp(total NLL / number of scored tokens).

The windows run through the engine itself as requests with `prompt_logprobs`, so the figure is that of what the
engine serves: its weight dtype, packed (quantized) weights and matmul path, chunked prefill and batching,
rather than of a side path that could differ from it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple, Sequence

from tqdm.auto import tqdm


class Window(NamedTuple):
    begin: int   # the window is tokens [begin, end)
    end: int
    first: int   # tokens [first, end) are scored, each predicted from tokens [begin, p)


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """HF's recipe: windows start every `stride` tokens; each scores the tokens after the previous one's end."""
    if context < 2 or not 0 < stride <= context:
        raise ValueError(f"need context >= 2 and 0 < stride <= context, got context={context}, stride={stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {num_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_scored: int
    num_windows: int
    context: int
    stride: int
    seconds: float

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (mean NLL {self.mean_nll:.5f}) over {self.num_scored} tokens, "
                f"{self.num_windows} windows of {self.context} tokens, stride {self.stride}, {self.seconds:.1f}s")


def perplexity(llm, token_ids: Sequence[int], context: int, stride: int, *, batch_windows: int = 32,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `llm` (a jaxinfer.LLM) on `token_ids`; `batch_windows` windows are in flight at once."""
    from jaxinfer.sampling_params import SamplingParams

    ids = [int(t) for t in token_ids]
    windows = sliding_windows(len(ids), context, stride)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    nll, scored = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress) as bar:
        for i in range(0, len(windows), batch_windows):
            batch = windows[i:i + batch_windows]
            outs = llm.generate([ids[w.begin:w.end] for w in batch], params)
            for w, out in zip(batch, outs):
                lps = out.prompt_logprobs  # entry j: log p(prompt[j] | prompt[:j]); entry 0 is None
                for p in range(w.first, w.end):
                    nll -= lps[p - w.begin][ids[p]]
                scored += w.end - w.first
            bar.update(len(batch))
    mean = nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, len(windows), context, stride,
                            time.perf_counter() - start)


def read_tokens(tokenizer, path: str, max_tokens: int | None = None) -> list[int]:
    """The text file tokenized without special tokens, cut to `max_tokens` (None: all)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:max_tokens] if max_tokens else ids


def engine_for_perplexity(model: str, context: int, **engine_args):
    """An LLM sized for windows of `context` tokens (each request generates one token after its window)."""
    from jaxinfer import LLM

    engine_args.setdefault("max_num_seqs", 16)
    engine_args.setdefault("enable_prefix_caching", False)
    return LLM(model, max_model_len=context + 1, **engine_args)
