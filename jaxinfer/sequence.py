"""One generation stream: prompt tokens, generated tokens and scheduling status.

A request with ``n > 1`` becomes ``n`` sequences that share ``request_id`` and ``group_id``; the scheduler
prefills the prompt once and forks the siblings from it (see ``scheduler.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# Stands for a token sampled by a step still running on the device (async scheduling): the next step already
# computes on it (the device feeds it in), and the engine writes the real id in when the step's results arrive.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks, is scheduled every step
    FINISHED_STOPPED = "finished_stopped"  # eos / stop token / stop string
    FINISHED_LENGTH_CAPPED = "finished_length_capped"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the client
    FINISHED_IGNORED = "finished_ignored"  # rejected (e.g. prompt longer than max_model_len)

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(eq=False)  # identity semantics: two sequences are never "equal" just because their tokens are
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any = None  # opaque to the scheduler; the engine decides when to stop
    group_id: Any = None  # siblings of one prompt (n > 1) share it; None = no siblings
    # Skip prefix-cache hits at admission: prompt log-probs need every prompt position run through the model.
    skip_prefix_cache: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V is in the cache. Tokens num_computed_tokens..num_tokens-1 still have to be run
    # through the model (the whole prompt at first, then one token — the last sampled one — per decode).
    num_computed_tokens: int = 0
    arrival_index: int = -1  # set by Scheduler.add: FCFS order
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    num_preemptions: int = 0
    # The sequence stops once it has this many output tokens (max_tokens): the scheduler gives no step to a
    # sequence whose last token, still pending, is its final one.
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: empty prompt")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def resolve_pending_token(self, token: int) -> None:
        """The step that sampled the last token finished: replace its placeholder with the real id."""
        if not self.output_token_ids or self.output_token_ids[-1] != PENDING_TOKEN:
            raise ValueError(f"{self} has no pending token")
        self.output_token_ids[-1] = token

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.name}, "
                f"prompt={self.num_prompt_tokens}, out={len(self.output_token_ids)}, "
                f"computed={self.num_computed_tokens})")
