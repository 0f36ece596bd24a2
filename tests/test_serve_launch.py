"""`python -m serve.launch` in a subprocess over the tiny model, with TLS and an API key: authentication on every
route and RPC, then SIGTERM under load (health NOT_SERVING, new requests refused, in-flight ones finish, exit 0,
no KV block left allocated)."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.grpc_stubs import pb, pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "s3cret"
AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True, timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture(scope="module")
def launched(tiny_dir, tls, tmp_path_factory):
    ready = tmp_path_factory.mktemp("launch") / "ready.json"
    log = open(ready.parent / "server.log", "w+")
    cmd = [sys.executable, "-m", "serve.launch", f"--model={tiny_dir}", "--max_num_seqs=4",
           "--max_num_batched_tokens=32", "--max_model_len=128", "--num_kv_blocks=32", "--noverbose",
           "--grpc_port=0", "--http_port=0", f"--ready_file={ready}", f"--api_key={KEY}", f"--tls_cert_file={tls[0]}",
           f"--tls_key_file={tls[1]}", "--warmup=full", "--background_warmup", "--shutdown_grace_s=120",
           "--served_model_name=tiny"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXINFER_QUIET": "1"})
    try:
        for _ in range(3000):  # bounded: 300 s
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), _tail(log)
        ports = json.loads(ready.read_text())
        assert ports["pid"] == proc.pid
        yield proc, ports, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def _channel(ports, tls):
    with open(tls[0], "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(f"127.0.0.1:{ports['grpc_port']}", credentials)


def _request(max_tokens=6):
    return pb.GenerateRequest(text="Hello there", params=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                           ignore_eos=True))


def test_api_key_on_every_rpc_and_route_over_tls(launched, tls):
    _, ports, _ = launched
    with _channel(ports, tls) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            for rpc, request in ((stub.GenerateUnary, _request()), (stub.ModelInfo, pb.ModelInfoRequest()),
                                 (stub.Tokenize, pb.TokenizeRequest(text="x"))):
                with pytest.raises(grpc.RpcError) as e:
                    rpc(request, metadata=metadata, timeout=60)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(_request(), metadata=metadata, timeout=60))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GenerateUnary(_request(), metadata=AUTH, timeout=300)
        assert len(reply.outputs[0].token_ids) == 6
        # health needs no key (probes cannot send one)
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING

    base = f"https://127.0.0.1:{ports['http_port']}"
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=tls[0]), timeout=300) as client:
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                             ("GET", "/no/such/route")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
        assert client.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        with openai.OpenAI(base_url=base + "/v1", api_key=KEY, http_client=client, max_retries=0) as oai:
            chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            assert chat.usage.completion_tokens == 4


def test_sigterm_under_load_drains_and_exits_0(launched, tls):
    proc, ports, log = launched
    results, started = {}, threading.Barrier(5, timeout=300)
    with _channel(ports, tls) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def stream(i):
            tokens, finish = [], None
            try:
                for n, r in enumerate(stub.Generate(_request(max_tokens=40), metadata=AUTH, timeout=300)):
                    tokens += [t for o in r.outputs for t in o.token_ids]
                    finish = r.outputs[-1].finish_reason if r.finished else finish
                    if n == 0:
                        started.wait()
                results[i] = (len(tokens), finish)
            except grpc.RpcError as e:
                results[i] = e.code()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()  # every stream has its first tokens
        proc.send_signal(signal.SIGTERM)
        for _ in range(600):  # bounded: 60 s
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            stub.GenerateUnary(_request(), metadata=AUTH, timeout=60)
            refused = None
        except grpc.RpcError as e:
            refused = e.code()
        assert refused in (grpc.StatusCode.UNAVAILABLE, None) and refused is not None, refused
        for t in threads:
            t.join(300)
    assert results == {i: (40, pb.FINISH_REASON_LENGTH) for i in range(4)}  # finished within the grace period
    assert proc.wait(120) == 0
    text = _tail(log)
    assert "draining" in text and "KV pool at exit: 0 of 32 blocks in use, 0 running, 0 waiting" in text, text
