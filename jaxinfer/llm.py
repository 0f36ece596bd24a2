"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

from typing import Iterator, Sequence

from tqdm.auto import tqdm

from jaxinfer.engine import EngineArgs, LLMEngine
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        if model is not None:
            engine_args["model"] = model
        self.engine = LLMEngine(EngineArgs(**engine_args))
        self.tokenizer = self.engine.tokenizer

    def warmup(self, param_variants=None, token_counts=None) -> float:
        return self.engine.warmup(param_variants, token_counts)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in input order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        # Validate everything before queueing anything: a bad request fails the call, not half of it.
        ids = [self._add(p, sp) for p, sp in zip(prompts, params)]
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
        request_id = self._add(prompt, sampling_params or SamplingParams())
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

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = False):
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        return outs

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        if isinstance(prompt, str):
            return self.engine.add_request(prompt, params)
        return self.engine.add_request(None, params, prompt_token_ids=list(prompt))


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
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
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
