"""OpenAI API request bodies (pydantic, strict) -> jaxinfer SamplingParams, and the response shapes.

Bodies are validated strictly: a wrong type is a 400 naming the field (no "0.5" -> 0.5 coercion), and so is an
unknown field. OpenAI ignores some unknown fields and vLLM rejects them; we reject them, because a misspelt
`max_token` or a `tools` list we cannot honour would otherwise change the answer without a word. `user` is
accepted and ignored (it only labels the caller). OpenAI fields with no engine support are refused when set to
anything but their no-op value (`echo`, `suffix`, `best_of`, `logit_bias`).

Extras in the body, as vLLM's: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens,
skip_special_tokens (and add_generation_prompt for chat).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams
from serve.service import top_logprobs

_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "literal", "function")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None

    def check_supported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "stream_options is only allowed with stream=true")

    def sampling_kwargs(self) -> dict:
        names = ("n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
                 "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        return list(p)

    def sampling_params(self) -> SamplingParams:
        self.check_supported()
        if self.echo:
            raise InvalidRequestError("echo", "echo is not supported")
        if self.suffix:
            raise InvalidRequestError("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of", "best_of is not supported (only best_of == n)")
        return SamplingParams(max_tokens=self.max_tokens, logprobs=self.logprobs, **self.sampling_kwargs())


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def sampling_params(self) -> SamplingParams:
        self.check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "top_logprobs needs logprobs=true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        try:  # None: until the context is full, as OpenAI's chat default
            return SamplingParams(max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                                  **self.sampling_kwargs())
        except InvalidRequestError as e:  # name the field as this request spelt it
            field = {"logprobs": "top_logprobs",
                     "max_tokens": "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
                     }.get(e.field, e.field)
            raise InvalidRequestError(field, e.message) from e

    def conversation(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], data) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes an InvalidRequestError naming its field."""
    if not isinstance(data, dict):
        raise InvalidRequestError("body", f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        path = [str(p) for p in error["loc"] if not (isinstance(p, str) and (
            "[" in p or p.split("-")[0].lower() in _TYPE_TAGS))]
        field = ".".join(path) or "body"
        if error["type"] == "extra_forbidden":
            raise InvalidRequestError(field, f"unknown or unsupported field {field!r}") from None
        raise InvalidRequestError(field, f"{field}: {error['msg']}") from None


# ------------------------------------------------------------------------------------ response pieces

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(token_text, token_ids, entries, k: int) -> dict:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def item(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(t, e[t]), top_logprobs=[item(i, lp) for i, lp in top_logprobs(e, k)])
                        for t, e in zip(token_ids, entries)]}


def completion_logprobs(token_text, token_ids, entries, k: int, offset: int = 0) -> tuple[dict, int]:
    """OpenAI completions (legacy) shape: {tokens, token_logprobs, top_logprobs, text_offset}; also returns the
    text offset after these tokens (streaming continues from it)."""
    tokens, offsets = [], []
    for t in token_ids:
        tokens.append(token_text(t))
        offsets.append(offset)
        offset += len(tokens[-1])
    tops = [{token_text(i): lp for i, lp in top_logprobs(e, k)} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
            "top_logprobs": tops, "text_offset": offsets}, offset
