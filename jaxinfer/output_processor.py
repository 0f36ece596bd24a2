"""The output processor: the core's token deltas -> streamed `RequestOutput`s (vLLM V1's OutputProcessor).

Runs on the caller's side. Per request it keeps one `OutputDetokenizer` per sample (incremental, UTF-8 safe
detokenization and stop strings) and the `CompletionOutput`s it streams. A stop string is text, so only this
side can see it: when one ends a sample, `RequestState.process` reports it and the caller tells the core to
finish that sample (`EngineCore.finish_sequence`; n > 1: only that one). Tokens the core sampled for it before
hearing so are dropped here.
"""
from __future__ import annotations

import dataclasses

from jaxinfer.engine_io import EngineRequest, RequestDelta
from jaxinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.tokenizer import OutputDetokenizer


@dataclasses.dataclass(frozen=True)
class StopStringFinish:
    """A stop string ended sample `index` of a request after `num_output_tokens` tokens: finish it in the core."""
    request_id: str
    index: int
    num_output_tokens: int


class RequestState:
    """The text side of one request: what it has streamed so far, per sample."""

    def __init__(self, request: EngineRequest, tokenizer):
        p, ids = request.params, request.prompt_token_ids
        self.request_id = request.request_id
        self.prompt = request.prompt
        self.prompt_token_ids = ids
        self.detoks = [OutputDetokenizer(tokenizer, p.stop, p.skip_special_tokens, prompt_ids=ids)
                       if tokenizer is not None else None for _ in range(p.n)]
        self.outputs = [CompletionOutput(index=i, logprobs=[] if p.logprobs is not None else None)
                        for i in range(p.n)]
        self.metrics = RequestMetrics(arrival_time=request.arrival_time)
        self.prompt_logprobs = [None] if p.prompt_logprobs is not None else None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    def process(self, delta: RequestDelta) -> list[StopStringFinish]:
        """Apply one core delta. Returns the samples a stop string just ended."""
        stops = []
        if delta.prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(delta.prompt_logprobs)
        for seq in delta.sequences:
            out, detok = self.outputs[seq.index], self.detoks[seq.index]
            if out.finish_reason is not None:
                continue  # ended here on a stop string already; the core had not heard yet
            if seq.token_ids and self.metrics.first_token_time is None:
                self.metrics.first_token_time = delta.time
            for k, token in enumerate(seq.token_ids):
                out.token_ids.append(token)
                out.delta_token_ids.append(token)
                if out.logprobs is not None and seq.logprobs is not None:
                    out.logprobs.append(seq.logprobs[k])
                if detok is not None:
                    d = detok.add(token)
                    out.delta_text += d.delta
                    if d.stopped:
                        out.finish_reason, out.stop_reason = "stop", d.stop_str
                        if seq.finish_reason is None:  # the core still runs it
                            stops.append(StopStringFinish(self.request_id, seq.index, len(out.token_ids)))
                        break
            if out.finish_reason is None and seq.finish_reason is not None:
                if detok is not None and seq.finish_reason != "abort":
                    out.delta_text += detok.finish()  # text held back for a possible stop string or character
                out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason
            if detok is not None:
                out.text = detok.text
        if self.metrics.finished_time is None and self.finished:
            self.metrics.finished_time = delta.time
        return stops

    def make_output(self) -> RequestOutput:
        """A RequestOutput with everything so far; the deltas restart from here."""
        outputs = [o.snapshot() for o in self.outputs]
        for o in self.outputs:
            o.delta_text, o.delta_token_ids = "", []
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             dataclasses.replace(self.metrics), self.prompt_logprobs)


class OutputProcessor:
    """The RequestStates of one front end's requests (for a front end that drives the core itself)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}

    def add_request(self, request: EngineRequest) -> RequestState:
        state = self._states[request.request_id] = RequestState(request, self.tokenizer)
        return state

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, deltas: list[RequestDelta]) -> tuple[list[RequestOutput], list[StopStringFinish]]:
        """One RequestOutput per delta's request, and the stop-string finishes to send to the core. Finished
        requests are forgotten."""
        outputs, stops = [], []
        for delta in deltas:
            state = self._states.get(delta.request_id)
            if state is None:
                continue  # not ours (finished or aborted here already)
            stops += state.process(delta)
            outputs.append(state.make_output())
            if state.finished:
                del self._states[delta.request_id]
        return outputs, stops
