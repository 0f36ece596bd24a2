"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

from typing import Iterator, Sequence

from tqdm.auto import tqdm

from jaxinfer.engine import EngineArgs, LLMEngine
from jaxinfer.errors import InvalidRequestError
from jaxinfer.outputs import RequestOutput
from jaxinfer.processor import Messages, is_chat
from jaxinfer.sampling_params import SamplingParams

Prompt = str | list[int] | Messages  # text, token ids, or one chat conversation


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        if model is not None:
            engine_args["model"] = model
        self.engine = LLMEngine(EngineArgs(**engine_args))
        self.tokenizer = self.engine.tokenizer

    def warmup(self, param_variants=None, token_counts=None, background: bool | None = None) -> float:
        return self.engine.warmup(param_variants, token_counts, background)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists or chat conversations) to completion; outputs in input order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        # Validate everything before queueing anything: a bad request fails the call, not half of it.
        requests = [self.engine.processor.process(p, sp) for p, sp in zip(prompts, params)]
        ids = []
        try:
            for request in requests:
                ids.append(self.engine.add_processed_request(request))
        except Exception:  # admission refused one (queue full): take back the ones already queued
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield RequestOutputs as tokens arrive (`.outputs[0].delta_text` is the new text)."""
        request_id = self.engine.add_request(prompt, sampling_params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:  # the consumer stopped early: free the request's blocks
            if self.engine.has_unfinished_requests():
                self.engine.abort_request(request_id)

    def chat(self, messages: Messages | list[Messages], sampling_params=None, use_tqdm: bool = False):
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if is_chat(messages) else messages
        return self.generate(conversations, sampling_params, use_tqdm=use_tqdm)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str) or is_chat(prompts):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError("sampling_params", f"got {len(params)} SamplingParams for {n} prompts")
    return params
