"""Online serving benchmark: a running server driven over HTTP (OpenAI /v1/completions, SSE) or gRPC
(jaxinfer.v1 Generate) with Poisson arrivals, against llama.cpp's `llama-server` on the same GGUF, same workload,
same rates, in the same run.

    # both servers started by the benchmark, two rates, 32 requests each
    python benchmarks/serving.py --systems jaxinfer-http,jaxinfer-grpc,llama-server --rates 0.3,2 \
        --num-requests 32 --llama-server /work/llamacpp/build/bin/llama-server

    # a server that is already running
    python benchmarks/serving.py --systems http --url http://127.0.0.1:8000 --rates 1

The workload is the offline benchmark's (`workload.build_workload`: WikiText-2 prompts of 16-128 tokens, exact
output lengths of 16-384 tokens with ignore_eos, greedy), sent as token ids so every system sees the same
prompts. Arrival gaps are exponential with mean 1/rate (seeded); `--max-concurrency` caps requests in flight.
Latency comes from the client's clock: TTFT (send -> first chunk with text), ITL (gaps between chunks), TPOT
((e2e - TTFT) / (tokens - 1)), end-to-end; mean / p50 / p90 / p99 via `workload.summarize_streams`. Goodput is
the rate of requests that met the SLO (`--slo-ttft-ms`, `--slo-tpot-ms`).

A server is started once per system and warmed with a few requests before any rate is timed; the rates then run
back to back against it. Each system gets the same number of CPU threads (`--threads`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.workload import (StreamTiming, build_workload, default_model_path, load_tokenizer,  # noqa: E402
                                 summarize_streams)


# ------------------------------------------------------------------------------------------------ clients

@dataclasses.dataclass(frozen=True)
class Outcome:
    timing: StreamTiming | None
    error: str | None = None


def _timing(start: float, times: list[float], tokens: list[int], total: int | None) -> StreamTiming:
    # Chunks count one token each unless the server said otherwise; the final usage corrects the last chunk so a
    # stream's total is the server's own count.
    if total is not None and tokens:
        tokens[-1] += total - sum(tokens)
    return StreamTiming(start, tuple(times), tuple(tokens))


async def http_stream(client, url: str, model: str, prompt: list[int], max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens, total = [], [], None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(None, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    total = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices") or ()):
                    times.append(time.perf_counter())
                    tokens.append(1)
    except Exception as e:  # noqa: BLE001  (a failed request is counted, not fatal)
        return Outcome(None, f"{type(e).__name__}: {e}")
    if not times:
        return Outcome(None, "no tokens")
    return Outcome(_timing(start, times, tokens, total))


async def grpc_stream(stub, pb, prompt: list[int], max_tokens: int) -> Outcome:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), params=pb.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    start = time.perf_counter()
    times, tokens = [], []
    try:
        async for response in stub.Generate(request):
            n = sum(len(c.token_ids) for c in response.outputs)
            if n:
                times.append(time.perf_counter())
                tokens.append(n)
    except Exception as e:  # noqa: BLE001
        return Outcome(None, f"{type(e).__name__}: {e}")
    if not times:
        return Outcome(None, "no tokens")
    return Outcome(_timing(start, times, tokens, None))


class Client:
    """One protocol's connection to one server: `send(prompt, max_tokens) -> Outcome`."""

    def __init__(self, protocol: str, address: str, model: str):
        self.protocol, self.address, self.model = protocol, address, model
        self._close = None

    async def __aenter__(self):
        if self.protocol == "http":
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(
                max_connections=1024, max_keepalive_connections=1024))
            self._close = self._client.aclose
        else:
            import grpc

            from serve.grpc_stubs import pb, pb_grpc

            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub, self._pb = pb_grpc.GenerationServiceStub(self._channel), pb
            self._close = self._channel.close
        return self

    async def __aexit__(self, *exc):
        await self._close()

    def send(self, prompt: list[int], max_tokens: int):
        if self.protocol == "http":
            return http_stream(self._client, self.address, self.model, prompt, max_tokens)
        return grpc_stream(self._stub, self._pb, prompt, max_tokens)


# ---------------------------------------------------------------------------------------------- load run

def arrival_offsets(num_requests: int, rate: float, seed: int) -> np.ndarray:
    """Seconds from the start at which each request is sent: a Poisson process of `rate` per second (all at
    once when rate is inf)."""
    if np.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


async def run_load(client: Client, workload, rate: float, max_concurrency: int | None, seed: int):
    offsets = arrival_offsets(len(workload), rate, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    begin = time.perf_counter()

    async def one(offset, request):
        await asyncio.sleep(max(0.0, begin + offset - time.perf_counter()))
        async with gate:
            return await client.send(list(request.prompt_token_ids), request.output_len)

    outcomes = await asyncio.gather(*(one(o, r) for o, r in zip(offsets, workload.requests)))
    return outcomes, time.perf_counter() - begin


def summarize(outcomes, workload, wall: float, slo_ttft: float, slo_tpot: float) -> dict:
    done = [(o.timing, r) for o, r in zip(outcomes, workload.requests) if o.timing is not None]
    timings = [t for t, _ in done]
    short = sum(t.num_tokens != r.output_len for t, r in done)
    good = sum(t.ttft <= slo_ttft and (t.tpot is None or t.tpot <= slo_tpot) for t in timings)
    s = summarize_streams(timings) if timings else {}
    row = dict(completed=len(done), failed=len(outcomes) - len(done), wrong_length=short, wall_s=wall,
               request_throughput=len(done) / wall, output_tok_s=sum(t.num_tokens for t in timings) / wall,
               goodput_req_s=good / wall)
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "p50", "p90", "p99"):
            row[f"{metric}_{stat}_ms"] = 1000 * s[metric][stat] if s else float("nan")
    errors = [o.error for o in outcomes if o.error]
    if errors:
        row["first_error"] = errors[0]
    return row


# ------------------------------------------------------------------------------------------------ servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ready(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def running(cmd: list[str], url: str, log_path: str, timeout_s: float, env=None):
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            ready_s = wait_http_ready(url, process, timeout_s)
            yield ready_s
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def jaxinfer_command(a, http_port: int, grpc_port: int) -> list[str]:
    return [sys.executable, "-m", "serve.launch", "--model=smollm2-135m", f"--http_port={http_port}",
            f"--grpc_port={grpc_port}", f"--max_num_seqs={a.max_num_seqs}", "--noenable_prefix_caching",
            f"--warmup={a.jaxinfer_warmup}", "--shutdown_grace_s=5", *a.jaxinfer_flag]


def llama_server_command(a, port: int, model_path: str) -> list[str]:
    # --parallel slots share one context of parallel * per-slot length; -cb is continuous batching.
    return [a.llama_server, "-m", model_path, "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
            "-tb", str(a.threads), "--parallel", str(a.llama_parallel), "-c", str(a.llama_parallel * 512),
            "-cb", "--no-webui"]


# ---------------------------------------------------------------------------------------------------- main

SYSTEMS = ("jaxinfer-http", "jaxinfer-grpc", "llama-server", "http", "grpc")


async def bench_system(name, protocol, address, model, workload, a) -> list[dict]:
    rows = []
    async with Client(protocol, address, model) as client:
        warm = build_workload(load_tokenizer(), 4, a.seed + 1, output_len_range=(4, 8))
        await run_load(client, warm, float("inf"), None, a.seed)
        for rate in a.rates:
            outcomes, wall = await run_load(client, workload, rate, a.max_concurrency, a.seed)
            row = summarize(outcomes, workload, wall, a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000)
            rows.append(dict(system=name, rate=rate, load_average=os.getloadavg()[0], **row))
            print(format_row(rows[-1]), flush=True)
    return rows


COLUMNS = ("system", "rate", "completed", "failed", "request_throughput", "output_tok_s", "goodput_req_s",
           "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms",
           "e2e_p99_ms", "load_average")


def format_row(row: dict) -> str:
    return "| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="jaxinfer-http,jaxinfer-grpc,llama-server",
                   help=f"comma-separated, of {', '.join(SYSTEMS)} (http / grpc: a server already at --url)")
    p.add_argument("--rates", default="0.3,2", help="requests per second, comma-separated ('inf': all at once)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--max-num-seqs", type=int, default=64, help="jaxinfer's max running sequences")
    p.add_argument("--jaxinfer-warmup", default="full", choices=["full", "decode", "none"])
    p.add_argument("--jaxinfer-flag", action="append", default=[],
                   help="extra flag for serve.launch, repeatable (e.g. --jaxinfer-flag=--executable_cache)")
    p.add_argument("--llama-server", default="/work/llamacpp/build/bin/llama-server")
    p.add_argument("--llama-parallel", type=int, default=16, help="llama-server --parallel slots")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="for --systems http")
    p.add_argument("--grpc-address", default="127.0.0.1:50051", help="for --systems grpc")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    a.rates = [float(r) for r in a.rates.split(",")]
    systems = a.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {sorted(unknown)}")

    workload = build_workload(load_tokenizer(), a.num_requests, a.seed)
    print(f"{workload.summary()}; rates {a.rates} req/s; {a.threads} threads per server; "
          f"SLO TTFT <= {a.slo_ttft_ms:.0f} ms, TPOT <= {a.slo_tpot_ms:.0f} ms\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    rows, ready = [], {}

    jaxinfer_protocols = [s.split("-")[1] for s in systems if s.startswith("jaxinfer-")]
    if jaxinfer_protocols:
        http_port, grpc_port = free_port(), free_port()
        url = f"http://127.0.0.1:{http_port}"
        env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
                   OMP_NUM_THREADS=str(a.threads))
        with running(jaxinfer_command(a, http_port, grpc_port), url, f"{a.log_dir}/serving_jaxinfer.log",
                     a.ready_timeout_s, env) as ready_s:
            ready["jaxinfer"] = ready_s
            for protocol in jaxinfer_protocols:
                address = url if protocol == "http" else f"127.0.0.1:{grpc_port}"
                rows += asyncio.run(bench_system(f"jaxinfer-{protocol}", protocol, address, "smollm2-135m",
                                                 workload, a))
    if "llama-server" in systems:
        if not os.path.exists(a.llama_server):
            print(f"llama-server: not found at {a.llama_server} (see BUILD.md, 'llama-server for benchmarks')")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with running(llama_server_command(a, port, default_model_path()), url,
                         f"{a.log_dir}/serving_llama_server.log", a.ready_timeout_s) as ready_s:
                ready["llama-server"] = ready_s
                rows += asyncio.run(bench_system("llama-server", "http", url, "smollm2", workload, a))
    for protocol in ("http", "grpc"):
        if protocol in systems:
            address = a.url if protocol == "http" else a.grpc_address
            rows += asyncio.run(bench_system(protocol, protocol, address, "smollm2-135m", workload, a))

    print("\nseconds to ready (process start to /health 200): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ready.items()))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(dict(rows=rows, ready_s=ready, workload=workload.summary(), args=vars(a)), f, indent=1)


if __name__ == "__main__":
    main()
