"""Per-request sampling parameters (vLLM-compatible field names and semantics).

Validation happens once, in `__post_init__`, so the sampler and the scheduler can trust every field.
Every error is an `InvalidRequestError` (a `ValueError`) whose `field` is the field and whose message names the
field and the rejected value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jaxinfer.errors import InvalidRequestError

# Temperatures below this are treated as greedy (as vLLM's _SAMPLING_EPS): dividing logits by ~0 would only
# overflow, and the argmax is what such a temperature means anyway.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


def _is_int(v) -> bool:
    # bool is an int subclass; `top_k=True` is a bug, not a request for top-1.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
        hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0)  # numpy scalars


def _bad(field: str, value, why: str) -> InvalidRequestError:
    return InvalidRequestError(field, f"{field} {why}, got {field}={value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Frozen: use `dataclasses.replace` (which re-validates) to derive a copy.

    top_k: -1 (also accepted: 0 or None) disables it. stop is normalised to a tuple of str and
    stop_token_ids to a tuple of int. max_tokens=None means "until the context window is full".
    logprobs: None = no logprobs, 0 = only the sampled token's logprob, k = also the top-k per token.
    Logprobs are of the model's raw distribution (log_softmax of the logits before penalties/temperature),
    as vLLM's default.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731  (frozen dataclass)

        if not _is_int(self.n) or self.n < 1:
            raise _bad("n", self.n, "must be an int >= 1")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(float(v)):
                raise _bad(name, v, "must be a finite number")
            set_(name, float(v))
        if self.temperature < 0:
            raise _bad("temperature", self.temperature, "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", self.repetition_penalty, "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise _bad(name, getattr(self, name), "must be in [-2, 2]")

        if self.top_k is None or self.top_k == 0:
            set_("top_k", -1)  # 0 / None: disabled, like -1
        elif not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be an int >= 1, or -1 / 0 / None to disable")

        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", self.seed, "must be an int or None")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _bad("max_tokens", self.max_tokens, "must be an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"must be <= max_tokens={self.max_tokens}")

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise _bad("stop", self.stop, "must be a str, a list of str, or None")
        if any(s == "" for s in stop):
            raise _bad("stop", self.stop, "must not contain an empty string")
        set_("stop", stop)

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "must be a list of non-negative ints")
        set_("stop_token_ids", tuple(ids))

        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise _bad(name, v, f"must be None or an int in [0, {MAX_LOGPROBS}]")

        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be a bool")

    # ---- helpers the engine and the sampler use ----
    @property
    def is_greedy(self) -> bool:
        """Temperature 0 (below SAMPLING_EPS): the argmax; top_k/top_p/min_p and the seed are irrelevant."""
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler needs this request's prompt+output token history."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def has_filters(self) -> bool:
        """Whether top_k / top_p / min_p restrict the sampled set (only meaningful when not greedy)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
