"""What crosses between the front end and the engine core (vLLM V1's EngineCoreRequest / EngineCoreOutput).

The front end (`processor.py`) turns a prompt into an `EngineRequest`: token ids only, already validated. The
core (`engine_core.py`) answers each step with one `RequestDelta` per request that got tokens: new token ids,
their logprobs, and the finish reasons the core decided without text (EOS, stop token ids, max_tokens,
max_model_len, abort). Text (detokenization, stop strings) is the front end's business (`output_processor.py`).
No text and no heavy imports here, so these cross threads (and could cross processes) cheaply.
"""
from __future__ import annotations

import dataclasses

from jaxinfer.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic() when the front end received it
    prompt: str | None = None  # the prompt text, when given as text (the core ignores it; outputs echo it)


@dataclasses.dataclass(slots=True)
class SequenceDelta:
    """New tokens of one of a request's n sequences (`index`) from one step."""
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # one entry per new token, when the request asked for them
    finish_reason: str | None = None  # "stop" (EOS / stop token id), "length", "abort"; None: still running
    stop_reason: int | None = None  # the stop token id that ended it


@dataclasses.dataclass(slots=True)
class RequestDelta:
    request_id: str
    sequences: list[SequenceDelta]
    time: float  # time.monotonic() when the step's results reached the host
    prompt_logprobs: list[dict[int, float] | None] | None = None  # entries for prompt positions new this step
    finished: bool = False  # the core finished every sequence of the request (it forgot the request)
