"""gRPC and OpenAI HTTP servers on loopback, one server for the module over a tiny random Llama (SmolLM2's
tokenizer): real clients (a gRPC stub, health and reflection clients, the `openai` package, httpx) against the
same engine run offline; bad and hostile input; cancels, deadlines and disconnects; admission; metrics."""
from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer import SamplingParams
from jaxinfer.engine import EngineArgs, LLMEngine
from serve.grpc_server import sampling_params as proto_sampling_params
from serve.grpc_stubs import SERVICE_NAME, pb, pb_grpc
from serve.server import BackgroundServer
from serve.service import Phase
from serve_utils import EngineGate, is_idle, offline, wait_idle

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_kv_blocks=32, verbose=False,
              max_waiting_requests=6)
TEXT = "Once upon a time"
CHAT = [{"role": "user", "content": "Name a colour."}]
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = dict(n=2, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = LLMEngine(EngineArgs(model=tiny_dir, **ENGINE))
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def ref(engine):
    """Offline answers (the oracle), computed before the server's engine thread owns the engine."""
    return dict(text=offline(engine, TEXT, SamplingParams(logprobs=2, **GREEDY)),
                chat=offline(engine, CHAT, SamplingParams(**GREEDY)),
                sampled=offline(engine, TEXT, SamplingParams(**SAMPLED)))


@pytest.fixture(scope="module")
def server(engine, ref):
    server = BackgroundServer(engine, served_model_name="tiny")
    yield server
    server.stop()
    assert is_idle(engine.stats)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


@pytest.fixture
def stats(server, engine):
    yield engine.stats
    assert wait_idle(engine.stats), "a request kept its KV blocks"


def _text_request(**params):
    return pb.GenerateRequest(text=TEXT, params=pb.SamplingParams(**{**GREEDY, **params}))


# --------------------------------------------------------------------------------------------------- gRPC

def test_grpc_streaming_generate_matches_offline(stub, ref, stats):
    want = ref["text"]
    responses = list(stub.Generate(_text_request(logprobs=2), timeout=120))
    assert [r.finished for r in responses] == [False] * (len(responses) - 1) + [True]
    tokens = [t for r in responses for o in r.outputs for t in o.token_ids]
    assert tokens == want.token_ids
    assert "".join(o.text for r in responses for o in r.outputs) == want.text
    logprobs = [lp for r in responses for o in r.outputs for lp in o.logprobs]
    assert [lp.token_id for lp in logprobs] == want.token_ids
    for lp, entry, token in zip(logprobs, want.outputs[0].logprobs, want.token_ids):
        assert lp.logprob == pytest.approx(entry[token])
        assert [t.token_id for t in lp.top] == sorted(entry, key=lambda t: -entry[t])[:2]
    final = responses[-1]
    assert final.outputs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        len(want.prompt_token_ids), 8, len(want.prompt_token_ids) + 8)
    assert len({r.request_id for r in responses}) == 1


def test_grpc_unary_with_token_ids_chat_and_request_id(stub, ref, stats):
    ids = ref["text"].prompt_token_ids
    reply = stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), request_id="mine-1",
                                                  params=pb.SamplingParams(**GREEDY)), timeout=120)
    assert reply.request_id == "mine-1" and reply.finished
    assert list(reply.outputs[0].token_ids) == ref["text"].token_ids and reply.outputs[0].text == ref["text"].text
    chat = stub.GenerateUnary(pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT]),
                                                 params=pb.SamplingParams(**GREEDY)), timeout=120)
    assert list(chat.outputs[0].token_ids) == ref["chat"].token_ids
    assert chat.usage.prompt_tokens == len(ref["chat"].prompt_token_ids)
    sampled = stub.GenerateUnary(pb.GenerateRequest(text=TEXT, params=pb.SamplingParams(**SAMPLED)), timeout=120)
    assert [list(o.token_ids) for o in sampled.outputs] == [o.token_ids for o in ref["sampled"].outputs]


def test_grpc_tokenize_and_model_info(stub, engine, tokenizer):
    tok = stub.Tokenize(pb.TokenizeRequest(text="Hello world, again"), timeout=30)
    assert list(tok.token_ids) == tokenizer.encode("Hello world, again")
    assert "".join(tok.tokens) == "Hello world, again"
    chat = stub.Tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])))
    assert list(chat.token_ids) == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert (info.model, info.context_length, info.vocab_size, info.max_num_seqs, info.num_kv_blocks,
            info.max_waiting_requests) == ("tiny", 128, 49152, 4, 32, 6)
    assert list(info.eos_token_ids) == sorted(engine.eos_token_ids) and info.dtype == "float32"


def test_proto_sampling_params_are_the_dataclass_fields():
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert {f.name for f in pb.SamplingParams.DESCRIPTOR.fields} == names
    values = dict(n=3, temperature=0.5, top_p=0.9, top_k=7, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                  frequency_penalty=-0.5, seed=42, stop=["a", "b"], stop_token_ids=[5, 6], ignore_eos=True,
                  max_tokens=9, min_tokens=2, logprobs=3, prompt_logprobs=1, skip_special_tokens=False)
    assert set(values) == names  # every field set to a non-default value
    assert proto_sampling_params(pb.SamplingParams(**values)) == SamplingParams(**values)
    assert proto_sampling_params(pb.SamplingParams()) == SamplingParams()  # unset: the engine's defaults


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(params=pb.SamplingParams(max_tokens=4)), "prompt"),
    (dict(text=TEXT, params=pb.SamplingParams(temperature=-1.0)), "temperature"),
    (dict(text=TEXT, params=pb.SamplingParams(top_p=math.nan)), "top_p"),
    (dict(text=TEXT, params=pb.SamplingParams(logprobs=50)), "logprobs"),
    (dict(text=TEXT, params=pb.SamplingParams(max_tokens=1000)), "max_tokens"),
    (dict(text=TEXT, params=pb.SamplingParams(n=99)), "n"),
    (dict(text=TEXT, params=pb.SamplingParams(stop_token_ids=[10**6])), "stop_token_ids"),
    (dict(text=TEXT, params=pb.SamplingParams(stop=[""])), "stop"),
    (dict(token_ids=pb.TokenIds(ids=[1, 49152])), "prompt_token_ids"),
    (dict(token_ids=pb.TokenIds(ids=[])), "prompt_token_ids"),
    (dict(text="word " * 200), "prompt"),
    (dict(chat=pb.ChatMessages()), "messages"),
])
def test_grpc_invalid_argument_names_the_field(stub, stats, request_kwargs, field):
    for rpc in (lambda r: list(stub.Generate(r, timeout=60)), lambda r: stub.GenerateUnary(r, timeout=60)):
        with pytest.raises(grpc.RpcError) as e:
            rpc(pb.GenerateRequest(**request_kwargs))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()


def test_grpc_malformed_messages_are_invalid_argument(server, stats):
    with grpc.insecure_channel(server.grpc_target) as channel:
        raw = channel.unary_unary(f"/{SERVICE_NAME}/GenerateUnary", request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        for data in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"):  # text with invalid UTF-8; corrupt wire format
            with pytest.raises(grpc.RpcError) as e:
                raw(data, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # over the 4 MiB message limit
            raw(pb.GenerateRequest(text="a" * (5 << 20)).SerializeToString(), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection(server, stub):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [listing] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in listing.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        [symbol] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=SERVICE_NAME)]))
        assert b"GenerateRequest" in symbol.file_descriptor_response.file_descriptor_proto[0]

        # Not serving (as while warming up): health NOT_SERVING, requests UNAVAILABLE / 503.
        server._call(server.state.set_phase(Phase.WARMING_UP), timeout=10)
        try:
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub.GenerateUnary(_text_request(), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in e.value.details()
            for method, path, body in [("GET", "/health", None), ("POST", "/v1/completions", {"prompt": "x"})]:
                r = httpx.request(method, server.http_url + path, json=body, timeout=30)
                assert r.status_code == 503 and "warming up" in r.json()["error"]["message"]
        finally:
            server._call(server.state.set_phase(Phase.SERVING), timeout=10)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------------------- OpenAI HTTP

def test_openai_completions_stream_and_not(oai, ref, stats):
    want = ref["text"]
    extra = dict(extra_body={"ignore_eos": True})
    r = oai.completions.create(model="tiny", prompt=TEXT, max_tokens=8, temperature=0, logprobs=2, **extra)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 8
    entries = want.outputs[0].logprobs
    assert r.choices[0].logprobs.token_logprobs == pytest.approx([e[t] for e, t in zip(entries, want.token_ids)])
    chunks = list(oai.completions.create(model="tiny", prompt=TEXT, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, **extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    sampled = oai.completions.create(model="tiny", prompt=TEXT, n=2, max_tokens=6, temperature=1.0, seed=5, **extra)
    assert sorted((c.index, c.text) for c in sampled.choices) == [(o.index, o.text) for o in ref["sampled"].outputs]


def test_openai_chat_stream_and_not(oai, ref, stats):
    want = ref["chat"]
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(**kwargs)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(want.prompt_token_ids) + 8
    # without include_usage there is no usage chunk
    plain = list(oai.chat.completions.create(stream=True, **kwargs))
    assert all(c.usage is None for c in plain) and plain[-1].choices
    # a stop string from the body ends the reply before it
    stop = want.text[5:9]
    cut = oai.chat.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].message.content == want.text[:want.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_tokenize_detokenize(http, tokenizer):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 128
    tok = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == tokenizer.encode("Hello world") and tok["count"] == len(tok["tokens"])
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert http.get("/health").status_code == 200


_C, _CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize("path, body, status, param, words", [
    (_C, b"{", 400, "body", "not valid JSON"),
    (_C, b"[1, 2]", 400, "body", "JSON object"),
    (_C, b"\xff\xfe{}", 400, "body", "UTF-8"),
    (_C, b'{"prompt": "\\ud800"}', 400, "body", "surrogate"),
    (_C, b'{"prompt": "x", "top_p": NaN}', 400, "top_p", "finite"),
    (_C, {"prompt": 3}, 400, "prompt", "valid"),
    (_C, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    (_C, {"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    (_C, b'{"prompt": "x", "presence_penalty": 1e999}', 400, "presence_penalty", "finite"),
    (_C, {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "context length"),
    (_C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (_C, {"prompt": "x", "n": 0}, 400, "n", ">= 1"),
    (_C, {"prompt": "x", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    (_C, {"prompt": "x", "stop_token_ids": [10**12]}, 400, "stop_token_ids", "49152"),
    (_C, {"prompt": "x", "bogus": 1}, 400, "bogus", "unknown"),
    (_C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream=true"),
    (_C, {"prompt": "word " * 200}, 400, "prompt", "max_model_len"),
    (_C, {"prompt": [1, 2, 10**9]}, 400, "prompt_token_ids", "49152"),
    (_C, {"prompt": "a " * 400_000}, 400, "prompt", "max_model_len"),  # a huge prompt, 800 kB
    (_C, {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    (_CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (_CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "user"),
    (_CHAT, {"messages": CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens", ">= 1"),
    (_CHAT, {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs", "logprobs=true"),
    (_CHAT, {"messages": CHAT, "tools": []}, 400, "tools", "unknown"),
])
def test_http_errors_name_the_problem(http, stats, path, body, status, param, words):
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_http_body_limit_and_routing_errors(http, stats):
    r = http.post(_C, content=b'{"prompt": "' + b"a" * (10 << 20) + b'"}')  # 10 MB
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(12):
            yield b"a" * (1 << 20)
    r = http.post(_C, content=chunked())
    assert r.status_code == 413
    assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/nothing").json()["error"]["message"]
    assert http.get(_C).status_code == 405


# A hypothesis fuzz of request bodies: any JSON object, with the real field names (and a few others), must get a
# 200 or an OpenAI-shaped 4xx naming something, never a 500, a hang or a leaked block.
_FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n",
           "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "stop_token_ids", "ignore_eos", "min_tokens", "stream", "model", "echo", "unknown_field"]
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                max_size=3), max_leaves=6)
_small = st.one_of(st.integers(-3, 6), st.floats(-3, 3), st.booleans(), st.none(), st.text(max_size=6))
_bodies = st.dictionaries(st.sampled_from(_FIELDS), st.one_of(_small, _json), max_size=6).map(
    lambda d: {"prompt": "Hi", **d} if "prompt" not in d and "messages" not in d and len(d) % 2 else d)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, chat=st.booleans())
def test_fuzzed_bodies_never_break_the_server(http, engine, body, chat):
    body = {**body, "stream": False} if "stream" in body else body
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
        body["max_tokens"] = min(body["max_tokens"], 8)  # bound each example's work
    r = http.post(_CHAT if chat else _C, content=json.dumps(body, allow_nan=True))
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert wait_idle(engine.stats, timeout=60)


# --------------------------------------------------------------------- cancels, deadlines, disconnects

def _generated(stats, request_id) -> int:
    t = stats.request_timings(request_id)
    return 0 if t is None else t.num_generation_tokens


def _aborted(stats, request_id) -> bool:
    t = stats.request_timings(request_id)
    return t is not None and t.finished_time is not None and t.finish_reason == "abort"


def _long_request(request_id: str, prompt_tokens: int = 8, max_tokens: int = 100):
    ids = [100 + i for i in range(prompt_tokens)]
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), request_id=request_id,
                              params=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def test_grpc_cancel_mid_stream_aborts_and_frees_blocks(stub, stats):
    with EngineGate(stats, lambda: _generated(stats, "cancel-1") >= 2) as gate:
        call = stub.Generate(_long_request("cancel-1"), timeout=120)
        first = next(call)
        assert first.outputs[0].token_ids
        assert gate.wait_paused()
        call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    assert wait_idle(stats) and _aborted(stats, "cancel-1") and _generated(stats, "cancel-1") < 100


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_grpc_deadline_aborts_mid_prefill_and_mid_decode(stub, stats, phase):
    rid = f"deadline-{phase}"

    def reached():
        t = stats.request_timings(rid)
        if t is None or t.scheduled_time is None:
            return False
        return t.first_token_time is None if phase == "prefill" else t.num_generation_tokens >= 2

    # A 100-token prompt takes 4 prefill chunks (32 tokens a step): the gate holds the engine after the first.
    with EngineGate(stats, reached) as gate:
        call = stub.Generate(_long_request(rid, prompt_tokens=100, max_tokens=25), timeout=3.0)
        received = []
        with pytest.raises(grpc.RpcError) as e:
            for r in call:
                received.append(r)
        assert gate.paused.is_set(), (e.value, stats.request_timings(rid))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(stats) and _aborted(stats, rid)
    if phase == "prefill":
        assert _generated(stats, rid) == 0 and not received
    else:
        assert received and _generated(stats, rid) < 25


def _aborts(stats) -> int:
    return stats.snapshot().finished_by_reason.get("abort", 0)


def test_http_stream_disconnect_aborts(server, stats):
    before = _aborts(stats)
    body = {"prompt": [100, 101, 102], "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    generated = stats.snapshot().num_generation_tokens
    with EngineGate(stats, lambda: stats.snapshot().num_generation_tokens > generated + 2) as gate:
        with httpx.Client(base_url=server.http_url, timeout=120) as client:
            with client.stream("POST", _C, json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # held: a discarded httpx iterator closes the connection
                first = next(lines)
                assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["text"]
                assert gate.wait_paused()
        # the client is gone (connection closed) while the engine is mid-request
    assert wait_idle(stats) and _aborts(stats) == before + 1


def test_http_blocking_request_disconnect_aborts(server, stats):
    before = _aborts(stats)
    body = json.dumps({"prompt": [100, 101, 102], "max_tokens": 100, "temperature": 0, "ignore_eos": True})
    generated = stats.snapshot().num_generation_tokens
    with EngineGate(stats, lambda: stats.snapshot().num_generation_tokens > generated + 2) as gate:
        with socket.create_connection(("127.0.0.1", server.servers.http_port), timeout=60) as sock:
            sock.sendall(f"POST {_C} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            assert gate.wait_paused()
    assert wait_idle(stats) and _aborts(stats) == before + 1


# ------------------------------------------------------------------------------------ admission, metrics

def test_admission_control_is_resource_exhausted_and_429(server, stub, stats):
    """With the engine held, 10 requests arrive; 6 may wait (max_waiting_requests), the other 4 are refused."""
    results = {}

    def grpc_call(i):
        try:
            results[i] = len(stub.GenerateUnary(_long_request(f"adm-{i}"), timeout=120).outputs[0].token_ids)
        except grpc.RpcError as e:
            results[i] = e.code()

    def http_call(i):
        r = httpx.post(server.http_url + _C, timeout=120, json={"prompt": [100, 101], "max_tokens": 4,
                                                                 "ignore_eos": True})
        results[i] = r.status_code if r.status_code != 200 else 4
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error"

    with EngineGate(stats, lambda: _generated(stats, "adm-holder") >= 1) as gate:
        holder = stub.Generate(_long_request("adm-holder"), timeout=120)
        next(holder)
        assert gate.wait_paused()
        threads = [threading.Thread(target=grpc_call if i % 2 else http_call, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        # every request's add command is queued (the engine thread applies them in order when released)
        for _ in range(6000):
            if len(server.engine._commands) == 10:
                break
            threading.Event().wait(0.01)
    for t in threads:
        t.join(120)
    holder.cancel()
    refused = [v for v in results.values() if v in (429, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    served = [v for v in results.values() if isinstance(v, int) and v in (4, 100)]
    assert len(results) == 10 and len(refused) == 4 and len(served) == 6, results


def _metrics(http) -> dict:
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_follow_the_engine_stats(http, oai, stats):
    before = _metrics(http)
    oai.completions.create(model="tiny", prompt=TEXT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    http.post(_C, json={"prompt": "x", "temperature": -1})
    assert wait_idle(stats)
    after, s = _metrics(http), stats.snapshot()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert after[("jaxinfer_generation_tokens_total", ())] == s.num_generation_tokens
    assert after[("jaxinfer_prompt_tokens_total", ())] == s.num_prompt_tokens
    assert delta("jaxinfer_generation_tokens_total") == 5
    assert delta("jaxinfer_e2e_request_latency_seconds_count") == 1
    assert delta("jaxinfer_time_to_first_token_seconds_count") == 1
    assert delta("jaxinfer_request_queue_time_seconds_count") == 1
    assert delta("jaxinfer_inter_token_latency_seconds_count") == 4
    assert delta("jaxinfer_request_outcomes_total", protocol="http", status="200", finish_reason="length") == 1
    assert delta("jaxinfer_request_outcomes_total", protocol="http", status="400", finish_reason="") == 1
    assert after[("jaxinfer_kv_cache_usage_percent", ())] == 0 and after[("jaxinfer_num_requests_running", ())] == 0
    assert after[("jaxinfer_kv_cache_blocks_total", ())] == 32
    # logprobs requests earlier compiled step variants warm-up had not: counted; a plain greedy request compiles none
    assert after[("jaxinfer_compilations_after_warmup_total", ())] == s.num_compilations_after_warmup
    assert delta("jaxinfer_compilations_after_warmup_total") == 0
    assert after[("jaxinfer_server_phase", (("jaxinfer_server_phase", "serving"),))] == 1
    for name in ("jaxinfer_num_preemptions_total", "jaxinfer_prefix_cache_hit_rate", "jaxinfer_num_requests_waiting"):
        assert (name, ()) in after
    startup = s.startup  # the engine's own start-up split, phase by phase
    assert after[("jaxinfer_engine_startup_seconds", (("phase", "time_to_ready"),))] == startup.time_to_ready_s > 0
    assert after[("jaxinfer_engine_startup_seconds", (("phase", "load"),))] == startup.load_s
    assert after[("jaxinfer_executables_pending", ())] == startup.num_executables_pending
