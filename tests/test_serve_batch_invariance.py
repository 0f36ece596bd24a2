"""Batch invariance through the servers, on the real default model: 200 concurrent greedy streaming requests,
half over gRPC and half over OpenAI HTTP, with varied prompt and output lengths; each must stream exactly the
tokens its prompt gets when run alone, and the KV pool must be completely free afterwards."""
from __future__ import annotations

import asyncio
import itertools
import json

import grpc
import httpx
import pytest

from conftest import wikitext_ids
from jaxinfer import SamplingParams
from serve.grpc_stubs import pb, pb_grpc
from serve.server import BackgroundServer
from serve_utils import is_idle, wait_idle

PROMPT_LENGTHS = (4, 13, 30, 52)
MAX_TOKENS = (3, 8, 16)
NUM_REQUESTS = 200


@pytest.fixture(scope="module")
def cases(llm, tokenizer):
    """(prompt ids, max_tokens) -> the tokens it gets alone (12 runs, one request each)."""
    prompts = [wikitext_ids(tokenizer, n, offset=4000 + 131 * i) for i, n in enumerate(PROMPT_LENGTHS)]
    out = {}
    for prompt, max_tokens in itertools.product(prompts, MAX_TOKENS):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out[(tuple(prompt), max_tokens)] = llm.generate([prompt], params)[0].token_ids
    return out


@pytest.fixture(scope="module")
def server(llm, cases):
    server = BackgroundServer(llm.engine, served_model_name="smollm2")
    yield server
    server.stop()


async def _grpc(stub, prompt, max_tokens):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), params=pb.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return [t async for r in stub.Generate(request, timeout=600) for o in r.outputs for t in o.token_ids]


async def _http(client, prompt, max_tokens):
    body = {"prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
    return "".join(text)


def test_200_concurrent_mixed_streams_match_their_solo_runs(server, cases, llm):
    keys = list(cases)
    jobs = [(i % 2 == 0, keys[i % len(keys)]) for i in range(NUM_REQUESTS)]

    async def main():
        limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=NUM_REQUESTS)
        async with grpc.aio.insecure_channel(server.grpc_target) as channel, \
                httpx.AsyncClient(base_url=server.http_url, timeout=600, limits=limits) as client:
            stub = pb_grpc.GenerationServiceStub(channel)
            calls = [_grpc(stub, *key) if over_grpc else _http(client, *key) for over_grpc, key in jobs]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=900)

    results = asyncio.run(main())
    tokenizer = llm.tokenizer
    for (over_grpc, key), got in zip(jobs, results):
        want = cases[key]
        if over_grpc:
            assert got == want, (key[1], len(key[0]))
        else:  # HTTP streams text: the same text as the solo tokens decode to
            assert got == tokenizer.decode(want), (key[1], len(key[0]))
    assert wait_idle(llm.engine.stats) and is_idle(llm.engine.stats)
    assert llm.engine.stats.snapshot().kv_blocks_used == 0
