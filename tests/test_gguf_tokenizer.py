"""The GGUF tokenizer we build without torch (jaxinfer.gguf_tokenizer) against transformers' own GGUF tokenizer
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, which needs torch, available in tests) as the oracle: token
ids, decodes, chat templates, special tokens and odd Unicode, on the default model's file (byte-level BPE, pre
"smollm") and on small GGUF files written here for the kinds we have no model file for (SentencePiece "llama"
with byte fallback, "llama-bpe", "qwen2", "gpt2")."""
import json
import os

import gguf
import pytest
from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers

from conftest import shared_data_path
from jaxinfer.gguf_tokenizer import GGUFTokenizerError, load_gguf_tokenizer
from jaxinfer.tokenizer import load_tokenizer

WIKITEXT_LINES = 3000

ODD_TEXTS = [
    "Family 👨‍👩‍👧‍👦, couple 👩‍❤️‍💋‍👨, thumbs 👍🏽👍🏿, flags 🇫🇷🇯🇵 and 🏳️‍🌈 keycap 1️⃣",
    "Combining: e\u0301 a\u0308 n\u0303 \u0041\u030a\u0323 Z\u0335\u0336\u0337 and precomposed é ä ñ",
    "CJK 中文测试：你好，世界。日本語のテキスト、カタカナ。한국어 텍스트",
    "RTL: עברית مرحبا بالعالم \u200f\u202eevil\u202c and digits ٣٤٥",
    "Controls: NUL\x00 SOH\x01 BEL\x07 ESC\x1b DEL\x7f C1\x85\x9f ZWSP\u200b BOM\ufeff",
    "Edges: \ufffd \uffff \ufffe \U0001f9ff \U000e0041 \U0010ffff private \ue000 \U000f0000",
    "  leading spaces, \t tabs\t\tand\n\n\nnewlines \r\n windows\r\n   ",
    "numbers 1234567 3.14159 1,000,000 and code: def f(x): return x**2  # ok",
    "",
    " ",
    "\n",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|><|im_end|>x",
    "not special: <|im_start |> <im_start> |im_end|",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi! 😀"},
     {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "中文 e\u0301 ok?"}],
]


def _wikitext_lines(split: str = "test.txt", n: int = WIKITEXT_LINES) -> list[str] | None:
    path = shared_data_path("wikitext-2", split)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()[:n]


def _hf_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _assert_same_ids_and_decodes(ours, ref, texts: list[str], bulk: bool = False):
    """Encode both ways (with and without specials) and decode every sequence (skipping specials or not).
    `bulk` goes straight to the two `tokenizers` backends (batched in Rust); otherwise through the HF wrappers, whose
    calls our `Tokenizer` makes."""
    if bulk:
        ours, ref = ours.backend_tokenizer, ref.backend_tokenizer
    for add_special in (True, False):
        if bulk:
            ids = [e.ids for e in ours.encode_batch(texts, add_special_tokens=add_special)]
            assert ids == [e.ids for e in ref.encode_batch(texts, add_special_tokens=add_special)]
        else:
            ids = [ours.encode(t, add_special_tokens=add_special) for t in texts]
            assert ids == [ref.encode(t, add_special_tokens=add_special) for t in texts]
        for skip in (True, False):
            decode = (lambda tok: tok.decode_batch(ids, skip_special_tokens=skip)) if bulk else (
                lambda tok: [tok.decode(i, skip_special_tokens=skip) for i in ids])
            assert decode(ours) == decode(ref)


def _byte_token_ids(ref, text: str) -> list[int]:
    """The single-byte tokens spelling `text`'s UTF-8 bytes, from the oracle's own vocabulary."""
    byte_tokens = [f"<0x{b:02X}>" for b in text.encode("utf-8")]  # SentencePiece byte fallback
    if ref.convert_tokens_to_ids(byte_tokens[0]) in (None, ref.unk_token_id):  # byte-level: its alphabet
        byte_tokens = list("".join(piece for piece, _ in ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)))
    ids = ref.convert_tokens_to_ids(byte_tokens)
    assert len(ids) == len(text.encode("utf-8")) and None not in ids
    return ids


def _invalid_utf8_sequences(ref, normal_ids: list[int]) -> list[list[int]]:
    emoji = _byte_token_ids(ref, "😀")  # F0 9F 98 80
    e_acute = _byte_token_ids(ref, "é")  # C3 A9
    return [emoji[:2], emoji[:3], emoji[1:], emoji[::-1], emoji[:2] + normal_ids + emoji[2:],
            normal_ids + emoji[:1] + normal_ids, e_acute[1:] + e_acute[:1], emoji[3:] * 3, emoji + emoji[:1]]


# ------------------------------------------------------------------ the default model's file (byte-level, "smollm")

def test_wikitext_ids_and_decodes_match_hf(tokenizer, hf_gguf_tokenizer):
    ref = hf_gguf_tokenizer
    lines = _wikitext_lines()
    if lines is None:
        pytest.skip("WikiText-2 test split not found under ../shared/data")
    _assert_same_ids_and_decodes(tokenizer.hf, ref, lines, bulk=True)
    document = "\n".join(lines[:400])  # one long text: context across lines
    ids = tokenizer.encode(document)
    assert ids == ref.encode(document) and len(ids) > 20_000
    assert tokenizer.decode(ids) == ref.decode(ids) == document  # byte-level BPE round-trips exactly


def test_chat_templates_match_hf(tokenizer, hf_gguf_tokenizer):
    ref = hf_gguf_tokenizer
    assert tokenizer.chat_template == ref.chat_template and "<|im_start|>" in tokenizer.chat_template
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert ids == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=False)
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0])
    assert ids[0] == 1 and ids[-4:] == tokenizer.encode("<|im_start|>assistant\n")  # <|im_start|> is id 1 in the file


def test_special_tokens_match_hf(tokenizer, hf_gguf_tokenizer):
    ref = hf_gguf_tokenizer
    _assert_same_ids_and_decodes(tokenizer.hf, ref, SPECIAL_TEXTS)
    ids = tokenizer.encode(SPECIAL_TEXTS[1])
    assert [i for i in ids if i < 3] == [0, 2, 2]  # <|endoftext|>, <|im_end|> x2 kept whole (ids from the file)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "textmore text x"
    assert tokenizer.bos_token_id == ref.bos_token_id == 1 and tokenizer.eos_token_ids == {2}
    assert tokenizer.vocab_size == len(ref) == 49152


def test_odd_unicode_matches_hf(tokenizer, hf_gguf_tokenizer):
    ref = hf_gguf_tokenizer
    _assert_same_ids_and_decodes(tokenizer.hf, ref, ODD_TEXTS)
    for text in ODD_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    for ids in _invalid_utf8_sequences(ref, tokenizer.encode(" ok")):
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert "\ufffd" in tokenizer.decode(ids)


# ------------------------------------------------------------------ synthetic GGUF files of the other kinds

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
               "{% else %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}")


def _training_corpus() -> list[str]:
    lines = _wikitext_lines("valid.txt", 2000)
    if lines is None:
        lines = [f"Sentence number {i} talks about engines, caches and kernels." for i in range(500)]
    return lines + ODD_TEXTS[:4]  # so some non-ASCII pieces get merged


def _train(pre_tokenizer, vocab_size: int = 1200, **trainer_args) -> dict:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizer
    raw.train_from_iterator(_training_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                                   **trainer_args))
    vocab = sorted(raw.get_vocab().items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(raw.to_str())["model"]["merges"]]
    return {"tokens": [t for t, _ in vocab], "merges": merges}


def _write_gguf(path: str, tokens, types, *, model: str, pre: str = "default", scores=None, merges=None,
                bos=None, eos=None, unk=None, pad=None, eot=None, add_bos=None, add_eos=None, template=None) -> str:
    """A header-only GGUF: a tiny llama architecture (what transformers needs to make a config) plus the
    tokenizer fields."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for value, add in ((scores, w.add_token_scores), (merges, w.add_token_merges), (bos, w.add_bos_token_id),
                       (eos, w.add_eos_token_id), (unk, w.add_unk_token_id), (pad, w.add_pad_token_id),
                       (eot, w.add_eot_token_id), (add_bos, w.add_add_bos_token), (add_eos, w.add_add_eos_token),
                       (template, w.add_chat_template)):
        if value is not None:
            add(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sentencepiece_files(tmp) -> dict[str, str]:
    """Llama 2 layout: <unk> <s> </s>, 256 byte-fallback tokens, then pieces scored by merge rank."""
    learned = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True))
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|im_start|>", "<|im_end|>", "<think>"]
    head_types = [2, 3, 3] + [6] * 256 + [3, 3, 4]
    tokens = head + learned["tokens"]
    types = head_types + [1] * len(learned["tokens"])
    scores = [0.0] * len(head) + [-float(i) for i in range(len(learned["tokens"]))]
    common = dict(model="llama", scores=scores, bos=1, eos=2, unk=0)
    tied = [0.0] * len(head) + [-float(i // 100) for i in range(len(learned["tokens"]))]
    return {
        # no merges in the file (as converted Llama 2 / TinyLlama files): recovered from the scores; no add_bos key
        "llama-spm": _write_gguf(os.path.join(tmp, "spm.gguf"), tokens, types, **common, template=LLAMA2_CHAT),
        # scores tied in groups of 100: the recovered merges' order then rests on the tie-breaks
        "llama-spm-tied": _write_gguf(os.path.join(tmp, "spm_tied.gguf"), tokens, types,
                                      **dict(common, scores=tied)),
        "llama-spm-merges": _write_gguf(os.path.join(tmp, "spm_merges.gguf"), tokens, types, **common,
                                        merges=learned["merges"], add_bos=False, add_eos=True, template=CHATML),
    }


def _byte_level_files(tmp) -> dict[str, str]:
    """One byte-level vocabulary (trained with GPT-2's split, so it has multi-digit and cross-class merges) under
    three `tokenizer.ggml.pre` names, each with its family's specials; the splits then give different ids."""
    learned = _train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n = len(learned["tokens"])
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    qwen = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    files = {}
    for pre, specials, template, ids in (
            ("llama-bpe", llama3, LLAMA3_CHAT, dict(bos=n, eos=n + 1, eot=n + 4, add_bos=True)),
            ("qwen2", qwen, CHATML, dict(bos=n, eos=n + 2, pad=n)),
            ("gpt2", llama3, None, dict(bos=n, eos=n + 1))):
        files[pre] = _write_gguf(os.path.join(tmp, f"{pre}.gguf"), learned["tokens"] + specials + ["<think>"],
                                 [1] * n + [3] * len(specials) + [4], model="gpt2", pre=pre,
                                 merges=learned["merges"], template=template, **ids)
    return files


def _file_vocab_size(path: str) -> int:
    return len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """{kind: (path, our Tokenizer, HF oracle)}."""
    tmp = str(tmp_path_factory.mktemp("gguf_tokenizers"))
    files = {**_sentencepiece_files(tmp), **_byte_level_files(tmp)}
    return {kind: (path, load_tokenizer(path), _hf_gguf_tokenizer(path)) for kind, path in files.items()}


KINDS = ["llama-spm", "llama-spm-tied", "llama-spm-merges", "llama-bpe", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_kind_matches_hf(synthetic, kind):
    path, ours, ref = synthetic[kind]
    texts = ODD_TEXTS + ["a <think> b<think>c", " <|im_start|> <s> x</s>"]
    if kind == "llama-spm-merges":
        texts += SPECIAL_TEXTS  # the other files have <|endoftext|> missing or their own specials
    _assert_same_ids_and_decodes(ours.hf, ref, texts)
    _assert_same_ids_and_decodes(ours.hf, ref, _wikitext_lines(n=500) or [], bulk=True)
    assert ours.vocab_size == _file_vocab_size(path) <= len(ref)  # see test_no_token_ids_past_the_vocabulary
    assert ours.bos_token_id == ref.bos_token_id and ref.eos_token_id in ours.eos_token_ids
    assert ours.chat_template == ref.chat_template
    if ours.chat_template:
        for messages in CONVERSATIONS:
            for add_generation_prompt in (True, False):
                assert (ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
                        == ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                   tokenize=True, return_dict=False))
    for ids in _invalid_utf8_sequences(ref, ours.encode(" ok", add_special_tokens=False)):
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_synthetic_kinds_are_told_apart(synthetic):
    """The comparisons above have power: files that differ only in `tokenizer.ggml.pre` (or in their scores) do
    tokenize the same text differently, so a wrong split regex (or merge order) would not go unnoticed."""
    texts = (_wikitext_lines(n=500) or []) + ODD_TEXTS
    ids = {kind: [synthetic[kind][1].encode(t, add_special_tokens=False) for t in texts] for kind in KINDS}
    for a, b in (("llama-bpe", "qwen2"), ("llama-bpe", "gpt2"), ("qwen2", "gpt2"), ("llama-spm", "llama-spm-tied")):
        assert ids[a] != ids[b], (a, b)


def test_synthetic_flags_as_the_file_says(synthetic):
    # Hand-checked against each file's fields: SentencePiece adds BOS unless told not to; add_eos appends EOS;
    # the byte-level files add BOS only when add_bos_token says so.
    for kind, first, last in (("llama-spm", ["<s>"], []), ("llama-spm-merges", [], ["</s>"]),
                              ("llama-bpe", ["<|begin_of_text|>"], []), ("qwen2", [], [])):
        _, ours, _ = synthetic[kind]
        plain = ours.encode("hello world", add_special_tokens=False)
        assert ours.encode("hello world") == (ours.hf.convert_tokens_to_ids(first) + plain
                                              + ours.hf.convert_tokens_to_ids(last)), kind
    _, spm, _ = synthetic["llama-spm"]
    assert spm.encode("the", add_special_tokens=False) == [spm.hf.convert_tokens_to_ids("▁the")]  # "▁" prepended
    _, llama3, _ = synthetic["llama-bpe"]
    assert llama3.hf.convert_tokens_to_ids("<|eot_id|>") in llama3.eos_token_ids  # tokenizer.ggml.eot_token_id


def test_no_token_ids_past_the_vocabulary(synthetic):
    """transformers appends its class-default "<|endoftext|>" to a vocabulary without one (a Llama 3 file) as a new
    id the model has no embedding for; we keep it ordinary text, encoded within the file's vocabulary."""
    path, ours, ref = synthetic["llama-bpe"]
    text = "a<|endoftext|>b"
    assert max(ours.encode(text)) < _file_vocab_size(path) == ours.vocab_size
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    assert ours.encode("plain words") == ref.encode("plain words")


def test_unsupported_or_missing_tokenizer_is_a_clear_error(tmp_path):
    bert = _write_gguf(str(tmp_path / "bert.gguf"), ["[UNK]", "a"], [2, 1], model="bert")
    with pytest.raises(GGUFTokenizerError, match="'bert'"):
        load_gguf_tokenizer(bert)
    w = gguf.GGUFWriter(str(tmp_path / "none.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFTokenizerError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "none.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFTokenizerError, match="junk.gguf"):
        load_tokenizer(str(tmp_path / "junk.gguf"))
