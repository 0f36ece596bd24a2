"""Tokenizer loading and streaming detokenization (incremental, UTF-8 safe; stop strings).

`load_tokenizer` accepts a HF model directory (transformers' AutoTokenizer on its tokenizer.json) or a `.gguf`
file, whose metadata `jaxinfer.gguf_tokenizer` turns into the same `tokenizers` pipeline transformers would build,
without transformers' GGUF reader (it imports torch, which serving must not need). `IncrementalDetokenizer`
turns a stream of token ids into text deltas without re-decoding the whole sequence; `StopStringMatcher` cuts
the streamed text at the first stop string; and `OutputDetokenizer` chains the two, which is what the engine
keeps per sequence.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

_REPLACEMENT = "\ufffd"  # what decode() yields for an incomplete UTF-8 sequence


class Tokenizer:
    """Thin wrapper over a HF tokenizer: the handful of calls the engine needs, with uniform return types."""

    def __init__(self, hf_tokenizer, extra_eos_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer
        eos = {i for i in extra_eos_ids if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: set[int] = eos

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens (e.g. <|im_start|>), which `hf.vocab_size` may leave out. The model's
        # embedding can still be larger (padded); never index logits with this.
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this tokenizer has no chat template; pass a plain prompt instead of messages")
        # Render to text and encode without adding specials: the template already writes BOS etc., and
        # transformers 5 returns a BatchEncoding (not a list) from tokenize=True.
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)})"


def load_tokenizer(path: str) -> Tokenizer:
    """A HF model directory (or an orbax checkpoint made by `jaxinfer convert`, which saves the tokenizer
    files beside the weights), or a `.gguf` file whose metadata carries the tokenizer."""
    path = os.path.abspath(os.path.expanduser(path))
    if path.endswith(".gguf"):
        from jaxinfer.gguf_tokenizer import load_gguf_tokenizer, read_gguf_vocab

        vocab = read_gguf_vocab(path)
        # llama.cpp also ends a turn on the end-of-turn / end-of-message ids (Llama 3's <|eot_id|>, <|eom_id|>).
        return Tokenizer(load_gguf_tokenizer(vocab), extra_eos_ids=(vocab.eot_id, vocab.eom_id))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path is neither a model directory nor a .gguf file: {path}")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    # Chat models often stop on several ids (Llama 3: <|end_of_text|>, <|eot_id|>, ...); those live in
    # generation_config.json / config.json rather than in the tokenizer.
    return Tokenizer(hf, extra_eos_ids=_eos_ids_from_configs(path))


def _eos_ids_from_configs(model_dir: str) -> set[int]:
    out: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(model_dir, name)
        if not os.path.exists(file):
            continue
        with open(file) as f:
            eos = json.load(f).get("eos_token_id")
        out.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return out


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the concatenated deltas equal `decode(all ids)`.

    Decodes only a short window (vLLM's prefix/read offsets): `ids[prefix:read]` is text already emitted,
    kept as left context so the tokenizer's decoder sees the same neighbourhood it would in a full decode
    (SentencePiece strips the "▁" space of only the *first* token of a decode, so a token decoded alone would
    lose its space). The delta is `decode(ids[prefix:]) - decode(ids[prefix:read])`. While the window ends in
    U+FFFD the last token(s) hold an incomplete multi-byte character; we emit nothing and wait for the rest.

    `prompt_ids` optionally seeds the window with the prompt's tail so that the first output token keeps its
    leading space (what a user streaming "prompt + output" expects); then the deltas concatenate to
    `decode(prompt + output) - decode(prompt)` instead.

    Limitation: with a SentencePiece ByteFallback decoder, a run of byte tokens that is *invalid* UTF-8 turns
    every byte of the run into U+FFFD, even ASCII bytes streamed earlier; such garbage output can differ from
    a full decode. Valid text (and anything from byte-level BPE) always matches exactly.
    """

    _CONTEXT_TOKENS = 6  # of prompt kept as left context; any few tokens do, the decoder state is local

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] | None = None):
        self._hf = getattr(tokenizer, "hf", tokenizer)  # our wrapper or a raw HF tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix = 0
        self._read = len(self._ids)
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append one or more ids; return the newly completed text (possibly "")."""
        if isinstance(token_ids, Iterable):
            self._ids.extend(int(t) for t in token_ids)
        else:  # int or numpy integer straight from the sampler
            self._ids.append(int(token_ids))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet (skipped special token) or an unfinished character
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (a truncated character decodes to U+FFFD,
        exactly as in a full decode)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        return self._advance(new_text[len(prefix_text):]) if len(new_text) > len(prefix_text) else ""

    def _advance(self, delta: str) -> str:
        # The emitted window becomes the new left context; older ids are never decoded again.
        self._prefix, self._read = self._read, len(self._ids)
        self._emitted.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._hf.decode(ids, skip_special_tokens=self.skip_special_tokens)


class StopStringMatcher:
    """Cuts streamed text at the earliest stop string (vLLM semantics: the stop string itself is dropped
    unless include_stop_str_in_output) and holds back any tail that might still grow into a stop string,
    so a streamed delta is never retracted."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped_on: str | None = None  # the stop string that ended the text
        self._pending = ""  # received but not yet emitted: a possible stop-string prefix
        self._emitted: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stopped_on is not None

    @property
    def text(self) -> str:
        """Output text so far (final once stopped)."""
        return "".join(self._emitted)

    def feed(self, delta: str) -> str:
        """Add newly generated text; return what can be emitted now. After a stop, returns "" forever."""
        if self.stopped or not delta:
            return ""
        if not self.stop:
            return self._emit(delta)
        # Everything emitted earlier was proven not to start a stop string, so only `pending` (the held
        # tail plus the new text) can contain one.
        pending = self._pending + delta
        hit = min(((pending.find(s), s) for s in self.stop if s in pending), default=None,
                  key=lambda t: (t[0], -len(t[1])))
        if hit is not None:
            pos, s = hit
            self.stopped_on, self._pending = s, ""
            return self._emit(pending[:pos + len(s)] if self.include_stop_str_in_output else pending[:pos])
        hold = self._partial_match_len(pending)
        self._pending = pending[len(pending) - hold:] if hold else ""
        return self._emit(pending[:len(pending) - hold])

    def flush(self) -> str:
        """Generation ended without a stop string: the held-back tail was real text after all."""
        out, self._pending = self._pending, ""
        return self._emit(out) if not self.stopped else ""

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self.stop) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text


@dataclass
class DetokenizerOutput:
    delta: str  # new text to stream (may be "")
    stopped: bool  # a stop string was hit: the sequence is finished, `text` is final
    stop_str: str | None = None


class OutputDetokenizer:
    """Per-sequence streaming text: incremental detokenization followed by stop-string matching."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False, prompt_ids: Sequence[int] | None = None):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt_ids)
        self._stops = StopStringMatcher(stop, include_stop_str_in_output)

    @property
    def text(self) -> str:
        return self._stops.text

    def add(self, token_ids: int | Iterable[int]) -> DetokenizerOutput:
        delta = self._stops.feed(self._detok.add(token_ids))
        return DetokenizerOutput(delta, self._stops.stopped, self._stops.stopped_on)

    def finish(self) -> str:
        """Call once when the sequence ends for another reason (EOS, max_tokens): the remaining text."""
        delta = self._stops.feed(self._detok.flush())
        return delta + self._stops.flush()
