"""LLMEngine: requests in, streamed outputs out, one model step per `step()` call (as vLLM's LLMEngine).

It composes, in the caller's thread, the three parts every front end uses:
  InputProcessor (processor.py)        text / token ids / chat messages -> validated EngineRequest
  EngineCore (engine_core.py)          scheduler + model runner: EngineRequest -> token deltas per step
  OutputProcessor (output_processor.py) token deltas -> detokenized, stop-string-checked RequestOutputs
`AsyncEngine` runs the same core on a thread of its own and the two processors on the callers' side.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from jaxinfer.engine_args import EngineArgs  # noqa: F401  (public here too: `from jaxinfer.engine import EngineArgs`)
from jaxinfer.engine_core import EngineCore, load_model
from jaxinfer.engine_io import EngineRequest
from jaxinfer.loaders.gguf import release_shared_reader
from jaxinfer.errors import InvalidRequestError, QueueFullError  # noqa: F401  (re-exported)
from jaxinfer.output_processor import OutputProcessor
from jaxinfer.outputs import RequestOutput
from jaxinfer.processor import InputProcessor
from jaxinfer.registry import resolve_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.stats import EngineStats
from jaxinfer.tokenizer import load_tokenizer


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        args = dataclasses.replace(args or EngineArgs(), **kwargs)
        self.args = args
        path = resolve_model(args.model)
        tokenizer_source = args.tokenizer or (None if path.startswith("random:") else path)  # random weights: none
        load_start = time.perf_counter()
        model = load_model(args)  # first: a bad checkpoint is reported as such, not as a bad tokenizer
        self.tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None
        release_shared_reader()  # a GGUF file's parse, shared by weights and tokenizer
        load_s = time.perf_counter() - load_start
        self.core = EngineCore(args, model, self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.core.record_load_time(load_s)
        self.processor = InputProcessor(self.tokenizer, vocab_size=self.config.vocab_size,
                                        max_model_len=self.core.max_model_len, max_num_seqs=args.max_num_seqs,
                                        max_num_batched_tokens=args.max_num_batched_tokens)
        self.output_processor = OutputProcessor(self.tokenizer)

    # The core's parts, as before the split (tests and benchmarks reach for them).
    @property
    def config(self):
        return self.core.config

    @property
    def runner(self):
        return self.core.runner

    @property
    def is_follower(self) -> bool:
        """A multi-process run's process other than 0: it only made process 0's device calls."""
        return self.core.is_follower

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def eos_token_ids(self) -> set[int]:
        return self.core.eos_token_ids

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    prompt_token_ids: list[int] | None = None, messages: list[dict] | None = None) -> str:
        """Validate and queue a request: `prompt` is text, token ids or chat messages. Raises
        InvalidRequestError (a ValueError naming the field) or QueueFullError before anything is queued, so a
        rejected request never disturbs the others."""
        request = self.processor.process(prompt, params, request_id, prompt_token_ids=prompt_token_ids,
                                         messages=messages)
        return self.add_processed_request(request)

    def add_processed_request(self, request: EngineRequest) -> str:
        """Queue a request `self.processor` made (a caller that validates a batch before queueing any of it)."""
        if request.request_id in self.output_processor:
            raise InvalidRequestError("request_id", f"request_id {request.request_id!r} is already in use")
        self.core.add_request(request)
        self.output_processor.add_request(request)
        return request.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (client gone or cancelled); its KV blocks are freed immediately. Returns its final
        output (finish_reason "abort"), or None if it was not running."""
        delta = self.core.abort_request(request_id)
        outputs, _ = self.output_processor.process([delta] if delta is not None else [])
        return outputs[0] if outputs else None

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one model step; return the outputs of the requests that got tokens (with async scheduling, those
        of the previous step: see engine_core.py)."""
        outputs, stops = self.output_processor.process(self.core.step())
        for stop in stops:
            self.core.finish_sequence(stop.request_id, stop.index, stop.num_output_tokens)
        return outputs

    # ------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        return self.core.metrics()

    def warmup(self, param_variants=None, token_counts=None, background: bool | None = None) -> float:
        """Make every token bucket ready (greedy and random sampling by default), or only the buckets that steps
        of these token counts use (a one-shot run that knows its prompt); see EngineCore.warmup."""
        start = time.perf_counter()
        self.core.warmup(param_variants, token_counts, background)
        return time.perf_counter() - start
