"""The tokenizer embedded in a GGUF file, rebuilt as a `tokenizers.Tokenizer` without torch.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types, scores and special
token ids as `tokenizer.ggml.*` metadata. transformers can convert that (`AutoTokenizer(gguf_file=...)`), but
its GGUF reader imports torch, which a JAX server must not need. So we read the metadata with `gguf` and build
the same `tokenizers` pipeline transformers builds, per `tokenizer.ggml.model`:

- `gpt2`: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet; a token written in plain text (a
  control token such as `<|im_start|>` is both) is respelled from its UTF-8 bytes. The pre-tokenizer splits
  with the regex of `tokenizer.ggml.pre` (Llama 3, Qwen2, Tekken) or, for any other name (`smollm`, `gpt2`,
  `default`, ...), with GPT-2's own regex inside the ByteLevel step.
- `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens): Metaspace "▁" prepended to the first
  word only; merges from the file or, when it has none (Llama 2 / Mistral / TinyLlama files), recovered from
  the vocabulary and its scores. Like transformers we always prepend "▁" (`add_space_prefix` is not consulted).

Control tokens become special added tokens (matched whole in text, dropped by skip_special_tokens), user-defined
ones plain added tokens. One deliberate difference from transformers: its tokenizer classes also register their
default specials (`<|endoftext|>` for byte-level, `<unk>`/`<s>`/`</s>` for SentencePiece) and, when the vocabulary
lacks them, append them as *new* ids past the model's vocabulary (a Llama 3 file gains an `<|endoftext|>` the
model has no embedding for). We mark those defaults special only where the vocabulary has them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)

# Split regexes of the byte-level pre-tokenizers (`tokenizer.ggml.pre`) used by the architectures jaxinfer
# serves; each is the pattern of that model family's own tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}

# Specials that transformers' GPT2Tokenizer / LlamaTokenizer register by default (see the module docstring).
_CLASS_DEFAULT_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>")}

# SentencePiece architectures whose tokenizer differs from plain Llama's (Gemma's whitespace tokens, Phi-3's
# normalizer-based prefix space); we do not rebuild those.
_UNSUPPORTED_SP_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")


class GGUFTokenizerError(ValueError):
    """The GGUF file has no usable tokenizer, or one of a kind we cannot rebuild."""


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.*` metadata of a GGUF file, as plain Python values."""

    model: str                      # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None                 # tokenizer.ggml.pre: which split regex a byte-level BPE uses
    architecture: str | None
    tokens: list[str]
    token_types: list[int] | None
    scores: list[float] | None
    merges: list[str] | None        # "left right" pairs, best first
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None       # end of turn (Llama 3's <|eot_id|>); llama.cpp stops on it like on EOS
    eom_id: int | None = None       # end of message (Llama 3.1's <|eom_id|>)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def token(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        if not 0 <= token_id < len(self.tokens):
            raise GGUFTokenizerError(f"special token id {token_id} is outside the vocabulary of {len(self.tokens)}")
        return self.tokens[token_id]


def read_gguf_vocab(path: str) -> GGUFVocab:
    """Read the tokenizer metadata. GGUFReader memory-maps the file and never touches tensor data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    from jaxinfer.loaders.gguf import shared_reader

    try:
        fields = shared_reader(path).fields  # the weight loader's parse, when it read this file just before
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise GGUFTokenizerError(f"corrupt or unreadable GGUF file {path}: {type(e).__name__}: {e}") from e

    def get(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    def get_int(key: str) -> int | None:
        value = get(key)
        return int(value) if value is not None else None

    def get_bool(key: str) -> bool | None:
        value = get(key)
        return bool(value) if value is not None else None

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise GGUFTokenizerError(f"{path} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    return GGUFVocab(
        model=model, pre=get("tokenizer.ggml.pre"), architecture=get("general.architecture"), tokens=tokens,
        token_types=get("tokenizer.ggml.token_type"), scores=get("tokenizer.ggml.scores"),
        merges=get("tokenizer.ggml.merges"),
        bos_id=get_int("tokenizer.ggml.bos_token_id"), eos_id=get_int("tokenizer.ggml.eos_token_id"),
        unk_id=get_int("tokenizer.ggml.unknown_token_id"), pad_id=get_int("tokenizer.ggml.padding_token_id"),
        eot_id=get_int("tokenizer.ggml.eot_token_id"), eom_id=get_int("tokenizer.ggml.eom_token_id"),
        add_bos=get_bool("tokenizer.ggml.add_bos_token"), add_eos=get_bool("tokenizer.ggml.add_eos_token"),
        add_space_prefix=get_bool("tokenizer.ggml.add_space_prefix"), chat_template=get("tokenizer.chat_template"))


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, soft hyphen, ...) take the code points from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    byte_char = gpt2_byte_alphabet()
    alphabet = set(byte_char.values())
    # A later duplicate spelling takes the name (dict semantics), as in transformers.
    return {t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8")): i
            for i, t in enumerate(tokens)}


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every way of cutting a piece into two pieces that are
    themselves in the vocabulary is a merge, ranked by the piece's score (higher first), then by longer left and
    longer right part; ties keep vocabulary order (piece, then the parts' ids)."""
    ranked = []
    for position, (piece, score) in enumerate(scores.items()):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), position, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _merges(vocab: GGUFVocab, token_ids: dict[str, int]) -> list[tuple[str, str]]:
    if vocab.merges is not None:
        return [tuple(m.split(" ")) for m in vocab.merges]
    if vocab.scores is None:
        raise GGUFTokenizerError(f"a {vocab.model!r} tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
    return merges_from_scores(token_ids, dict(zip(vocab.tokens, vocab.scores)))


def _byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    token_ids = _byte_level_vocab(vocab.tokens)
    tok = Tokenizer(models.BPE(token_ids, _merges(vocab, token_ids), dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(vocab.pre)
    if split is None:  # GPT-2's regex, built into the ByteLevel pre-tokenizer
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    if vocab.architecture in _UNSUPPORTED_SP_ARCHS:
        raise GGUFTokenizerError(f"the SentencePiece tokenizer of GGUF architecture {vocab.architecture!r} is not "
                                 "supported (only the Llama kind)")
    token_ids = {t: i for i, t in enumerate(vocab.tokens)}
    tok = Tokenizer(models.BPE(token_ids, _merges(vocab, token_ids), dropout=None, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def control_tokens(vocab: GGUFVocab) -> list[str]:
    """Tokens to match whole and treat as special. A byte-level vocabulary spells every real token in the byte
    alphabet, so a "control" token outside it is a llama.cpp mislabel and stays out (as in transformers)."""
    types = vocab.token_types or ()
    alphabet = set(gpt2_byte_alphabet().values()) if vocab.model == "gpt2" else None
    return [t for t, kind in zip(vocab.tokens, types) if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers` pipeline for this vocabulary: model, pre-tokenizer, decoder, added tokens, and a
    post-processor that adds BOS/EOS as the file says (llama.cpp's default: BOS for SentencePiece only)."""
    builder = _BUILDERS.get(vocab.model)
    if builder is None:
        raise GGUFTokenizerError(f"GGUF tokenizer model {vocab.model!r} is not supported; jaxinfer builds "
                                 f"{sorted(_BUILDERS)} (byte-level BPE, SentencePiece BPE)")
    tok = builder(vocab)
    in_vocab = tok.get_vocab(with_added_tokens=False)
    defaults = [t for t in _CLASS_DEFAULT_SPECIALS[vocab.model] if t in in_vocab]
    control = control_tokens(vocab)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(defaults + control)])
    user_defined = [t for t, kind in zip(vocab.tokens, vocab.token_types or ())
                    if kind == _USER_DEFINED and t in in_vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    tok.post_processor = _bos_eos_template(vocab, tok)
    return tok


def _add_bos(vocab: GGUFVocab) -> bool:
    return vocab.add_bos if vocab.add_bos is not None else vocab.model == "llama"


def _bos_eos_template(vocab: GGUFVocab, tok: Tokenizer) -> processors.TemplateProcessing:
    # (A BOS/EOS spelled outside a byte-level alphabet has no id yet: PreTrainedTokenizerFast adds it, and
    # transformers 5 then rebuilds this template from its add_bos_token / add_eos_token anyway.)
    bos, eos = vocab.token(vocab.bos_id), vocab.token(vocab.eos_id)
    first = [bos] if _add_bos(vocab) and bos is not None and tok.token_to_id(bos) is not None else []
    last = [eos] if vocab.add_eos and eos is not None and tok.token_to_id(eos) is not None else []
    single = [f"{t}:0" for t in first] + ["$A:0"] + [f"{t}:0" for t in last]
    pair = single + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(first + last)])


def load_gguf_tokenizer(source: str | GGUFVocab):
    """A `transformers.PreTrainedTokenizerFast` (no torch needed) for the tokenizer of this GGUF file (a path,
    or its metadata from `read_gguf_vocab`)."""
    from transformers import PreTrainedTokenizerFast

    vocab = source if isinstance(source, GGUFVocab) else read_gguf_vocab(source)
    backend = build_tokenizer(vocab)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=vocab.token(vocab.bos_id), eos_token=vocab.token(vocab.eos_id),
        unk_token=vocab.token(vocab.unk_id), pad_token=vocab.token(vocab.pad_id), add_bos_token=_add_bos(vocab),
        add_eos_token=bool(vocab.add_eos), clean_up_tokenization_spaces=False, chat_template=vocab.chat_template)
