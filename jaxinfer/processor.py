"""The input processor: a prompt (text, token ids or chat messages) -> a validated `EngineRequest`.

Runs on the caller's side (vLLM V1's Processor): tokenizing, chat templates and validation never occupy the
thread that steps the model. Every rejection is an `InvalidRequestError` naming the field, raised before the
engine sees anything, so a bad request never disturbs the others. What needs the engine's live state (a request
id already in use, a full queue) is checked at the core's admission instead.
"""
from __future__ import annotations

import itertools
import operator
import time
from typing import Sequence

from jaxinfer.engine_io import EngineRequest
from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams

Messages = list[dict]  # chat messages: [{"role": "user", "content": "..."}, ...]
PromptInput = str | Sequence[int] | Messages


def is_chat(prompt) -> bool:
    """Chat messages (a list of dicts), as opposed to a text prompt or token ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_prompt_ids(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Render chat messages with the tokenizer's chat template and tokenize them. Malformed messages, a
    tokenizer without a template, or a template that rejects the conversation raise InvalidRequestError."""
    if tokenizer is None:
        raise InvalidRequestError("messages", "this model has no tokenizer: pass prompt_token_ids")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages", "messages must be a non-empty list of {role, content} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError("messages", f"messages[{i}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InvalidRequestError("messages", f"messages[{i}].{key} must be a string, got {m.get(key)!r}")
    try:
        from jinja2 import TemplateError
    except ImportError:  # transformers always brings jinja2; this only keeps the import optional
        TemplateError = ValueError  # noqa: N806
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    except (ValueError, TemplateError) as e:  # no template, or the template raised on this conversation
        raise InvalidRequestError("messages", f"the chat template rejected the messages: {e}") from e


class InputProcessor:
    """Validates requests against the engine's limits and tokenizes them. Stateless apart from the request-id
    counter, so one instance serves any number of callers and threads."""

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_n = min(max_num_seqs, max_num_batched_tokens)
        self._max_num_seqs, self._max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self._ids = itertools.count()

    def process(self, prompt: PromptInput | None, params: SamplingParams | None = None,
                request_id: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                messages: Messages | None = None, add_generation_prompt: bool = True,
                arrival_time: float | None = None) -> EngineRequest:
        """`prompt` is text, token ids or chat messages (or pass `prompt_token_ids` / `messages` explicitly)."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params",
                                      f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise InvalidRequestError("request_id", f"request_id must be a non-empty string, got {request_id!r}")
        text = None
        if messages is None and prompt_token_ids is None:
            if is_chat(prompt):
                messages = prompt
            elif isinstance(prompt, str):
                text = prompt
            elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "__array__"):
                prompt_token_ids = prompt
            else:
                raise InvalidRequestError("prompt", "prompt must be a string, a list of token ids or a list of chat "
                                                    f"messages, got {type(prompt).__name__}")
        if messages is not None:
            field, ids = "messages", chat_prompt_ids(self.tokenizer, messages, add_generation_prompt)
        elif prompt_token_ids is not None:
            field, ids = "prompt_token_ids", self._check_token_ids(prompt_token_ids)
            text = prompt if isinstance(prompt, str) else None
        else:
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer: pass prompt_token_ids")
            field, ids = "prompt", self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequestError(field, "prompt is empty")
        if field != "prompt_token_ids" and max(ids) >= self.vocab_size:  # a tokenizer that does not fit the model
            raise InvalidRequestError(field, f"the tokenizer produced token id {max(ids)}, outside the model's "
                                             f"vocabulary of {self.vocab_size}")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(field, f"prompt has {len(ids)} tokens, more than fits max_model_len="
                                             f"{self.max_model_len} with at least one generated token")
        if params.n > self.max_n:
            raise InvalidRequestError("n", f"n={params.n} exceeds max_num_seqs={self._max_num_seqs} "
                                           f"or max_num_batched_tokens={self._max_num_batched_tokens}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        return EngineRequest(request_id, ids, params, arrival_time, text)

    def _check_token_ids(self, token_ids) -> list[int]:
        try:
            ids = [operator.index(t) for t in token_ids]  # ints and numpy integers; not floats or strings
        except TypeError:
            ids = None
        if ids is None or any(isinstance(t, bool) for t in token_ids):
            raise InvalidRequestError("prompt_token_ids", "prompt_token_ids must be a list of ints")
        bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids",
                                      f"prompt_token_ids must be in [0, {self.vocab_size}), got {bad}")
        return ids
