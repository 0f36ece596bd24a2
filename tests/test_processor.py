"""The input processor (prompt -> validated EngineRequest) and the typed errors, without an engine: every bad
request is an InvalidRequestError naming its field; chat messages render exactly as HF's chat template."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from jaxinfer import EngineError, InvalidRequestError, QueueFullError, SamplingParams
from jaxinfer.processor import InputProcessor, chat_prompt_ids

LIMITS = dict(vocab_size=49152, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return InputProcessor(tokenizer, **LIMITS)


def test_error_types_are_distinct():
    e = InvalidRequestError("temperature", "temperature must be >= 0")
    assert isinstance(e, ValueError) and e.field == "temperature" and str(e) == "temperature must be >= 0"
    assert not isinstance(QueueFullError("full"), ValueError)  # 429, never a 400
    assert not isinstance(EngineError("bug"), ValueError)  # 500, never a 400
    copy = pickle.loads(pickle.dumps(e))
    assert (type(copy), copy.field, str(copy)) == (InvalidRequestError, "temperature", str(e))
    q = pickle.loads(pickle.dumps(QueueFullError("full", limit="max_waiting_prompt_tokens")))
    assert q.limit == "max_waiting_prompt_tokens"


def test_sampling_params_errors_name_their_field():
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("n", 0), ("stop", [3]), ("logprobs", 99)):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**{field: value})
        assert e.value.field == field


def test_text_token_ids_and_chat_prompts(processor, tokenizer):
    text = "The history of the Roman Empire"
    r = processor.process(text, SamplingParams(max_tokens=3), request_id="a")
    assert r.prompt_token_ids == tokenizer.hf.encode(text) and r.prompt == text and r.request_id == "a"
    assert r.params.max_tokens == 3 and r.arrival_time > 0
    ids = processor.process([1, 2, 3]).prompt_token_ids
    assert ids == [1, 2, 3]
    assert processor.process(np.array([4, 5], np.int32)).prompt_token_ids == [4, 5]  # numpy ids are ints too
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    # Oracle: HF's own template rendering, tokenized without extra specials.
    rendered = tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = tokenizer.hf.encode(rendered, add_special_tokens=False)
    assert processor.process(messages).prompt_token_ids == want
    assert processor.process(None, messages=messages).prompt_token_ids == want
    assert chat_prompt_ids(tokenizer, messages) == want
    assert processor.process(messages).prompt is None
    # Request ids are generated unique when not given.
    assert len({processor.process([1]).request_id for _ in range(5)}) == 5


@pytest.mark.parametrize("prompt,kwargs,field,match", [
    ("", {}, "prompt", "prompt is empty"),
    ([], {}, "prompt_token_ids", "prompt is empty"),
    (None, dict(prompt_token_ids=[]), "prompt_token_ids", "prompt is empty"),
    ([1, 49152], {}, "prompt_token_ids", r"\[0, 49152\), got 49152"),
    ([1, -3], {}, "prompt_token_ids", "got -3"),
    ([1, 2.0], {}, "prompt_token_ids", "list of ints"),
    ([True, 2], {}, "prompt_token_ids", "list of ints"),
    (["a", "b"], {}, "prompt_token_ids", "list of ints"),
    ([5] * 64, {}, "prompt_token_ids", "max_model_len=64"),
    ("word " * 80, {}, "prompt", "max_model_len=64"),
    (42, {}, "prompt", "prompt must be a string"),
    ([{"role": "user"}], {}, "messages", r"messages\[0\].content"),
    ([{"role": "user", "content": 3}], {}, "messages", r"messages\[0\].content"),
    (None, dict(messages=[]), "messages", "non-empty list"),
    (None, dict(messages=["hi"]), "messages", r"messages\[0\] must be a dict"),
    ("hi", dict(params=SamplingParams(n=5)), "n", "n=5 exceeds max_num_seqs=4"),
    ("hi", dict(params={"temperature": 0}), "sampling_params", "must be SamplingParams"),
    ("hi", dict(request_id=""), "request_id", "non-empty string"),
    ("hi", dict(request_id=7), "request_id", "non-empty string"),
])
def test_bad_requests_name_the_field(processor, prompt, kwargs, field, match):
    kwargs = dict(kwargs)
    params, request_id = kwargs.pop("params", None), kwargs.pop("request_id", None)
    with pytest.raises(InvalidRequestError, match=match) as e:
        processor.process(prompt, params, request_id, **kwargs)
    assert e.value.field == field


def test_chat_template_rejection_is_a_client_error(tokenizer):
    class NoTemplate:  # a tokenizer without a chat template, as Tokenizer.apply_chat_template reports it
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ValueError("this tokenizer has no chat template; pass a plain prompt instead of messages")

    with pytest.raises(InvalidRequestError, match="no chat template") as e:
        chat_prompt_ids(NoTemplate(), [{"role": "user", "content": "hi"}])
    assert e.value.field == "messages"
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        InputProcessor(None, **LIMITS).process("text")
    assert InputProcessor(None, **LIMITS).process([7, 8]).prompt_token_ids == [7, 8]
