import dataclasses

import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling_params import SamplingParams


def test_defaults_are_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == () and p.stop_token_ids == () and not p.ignore_eos
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and not p.is_greedy and not p.has_penalties and not p.has_filters


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=2.5), dict(top_p=0.01), dict(top_p=1), dict(top_k=1), dict(top_k=50),
    dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=0.5), dict(repetition_penalty=2.0),
    dict(presence_penalty=-2.0), dict(frequency_penalty=2.0), dict(seed=0), dict(seed=-5), dict(seed=2**70),
    dict(stop="###"), dict(stop=["a", "b"]), dict(stop=("a",)), dict(stop_token_ids=[1, 2]), dict(ignore_eos=True),
    dict(max_tokens=1), dict(max_tokens=None, min_tokens=100), dict(min_tokens=16), dict(logprobs=0),
    dict(logprobs=20), dict(prompt_logprobs=5), dict(n=4), dict(skip_special_tokens=False),
])
def test_valid(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("frequency_penalty", 3.0), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens=16
    ("n", 0), ("n", 1.0),
    ("stop", 5), ("stop", ["a", 3]), ("stop", [""]), ("stop", {"a"}),
    ("stop_token_ids", [1, "2"]), ("stop_token_ids", [1.0]), ("stop_token_ids", 7), ("stop_token_ids", [-1]),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("prompt_logprobs", 21), ("prompt_logprobs", -1),
    ("seed", 1.5), ("seed", "42"), ("seed", True),
    ("ignore_eos", 1),
])
def test_invalid_raises_naming_field_and_value(field, value):
    with pytest.raises(InvalidRequestError) as e:  # a ValueError carrying the field (servers map it to 400)
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert field in msg and repr(value) in msg, msg
    assert isinstance(e.value, ValueError) and e.value.field == field


def test_normalisation_and_helpers():
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=None).top_k == -1
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["x", "y"]).stop == ("x", "y")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties
    assert SamplingParams(top_p=0.9).has_filters and SamplingParams(min_p=0.1).has_filters
    assert isinstance(SamplingParams(temperature=1).temperature, float)


def test_frozen_and_replace_revalidates():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    assert dataclasses.replace(p, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)
