"""Single-stream decode on the default model's Q4_1 GGUF: jaxinfer, in each weight form it can run that file in,
against llama.cpp's server on the same file, measured in one run with the runs interleaved (so load changes on
this shared machine hit every entry alike), and the bytes each reads per token against the memory bandwidth
measured in the same run.

    python benchmarks/decode_vs_llamacpp.py [--server /work/llamacpp/build/bin/llama-server] [--tokens 128]
        [--runs 5] [--variants default,int8,int8-w8a8,bf16]

Variants (EngineArgs): "default" (quantization=None: the engine's CPU choice for a packed checkpoint,
jaxinfer.quantization.runtime), "packed" (the Q4_1 / Q8_0 blocks as stored), "int8" (layer weights re-quantized
to int8 per channel from the file's blocks, exact weight-only formulation), "int8-w8a8" (the same weights through
int8 x int8 dots with activations quantized per row: matmul_backend="xla_w8a8"), "bf16" / "f32" (expanded to
float: quantization="dequantize"). Decode tok/s is tokens after the
first over the time after the first, streaming one greedy request of --tokens tokens (ignore_eos) after the same
prompt; llama.cpp's is its own `timings.predicted_per_second` (2 threads, no polling, no prompt cache).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

DEFAULT_SERVER = "/work/llamacpp/build/bin/llama-server"
VARIANTS = {"default": dict(), "packed": dict(quantization="packed"), "int8": dict(quantization="int8"),
            "int8-w8a8": dict(quantization="int8", matmul_backend="xla_w8a8"),
            "bf16": dict(quantization="dequantize", weight_dtype="bfloat16"),
            "f32": dict(quantization="dequantize", weight_dtype="float32")}


def memory_bandwidth() -> dict:
    """GB/s: numpy copy of 512 MiB (bytes read + written), and a one-thread numpy sum (bytes read)."""
    import numpy as np

    a = np.ones(2**27, np.float32)
    b = np.empty_like(a)
    copy, read = [], []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - start)
    return {"copy": 2 * a.nbytes / statistics.median(copy) / 1e9, "read": a.nbytes / statistics.median(read) / 1e9}


class LlamaServer:
    """llama-server on loopback, started and stopped by this object."""

    def __init__(self, binary: str, model: str, threads: int = 2, ctx: int = 2048):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "-m", model, "-t", str(threads), "-c", str(ctx), "-np", "1", "--poll", "0", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-disable"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def decode_tok_s(self, prompt_ids: list[int], n: int) -> float:
        body = json.dumps({"prompt": prompt_ids, "n_predict": n, "temperature": 0.0, "ignore_eos": True,
                           "cache_prompt": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        return float(out["timings"]["predicted_per_second"])

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def decode_tok_s(llm, prompt_ids: list[int], n: int) -> float:
    """Tokens after the first / time after the first, streaming one greedy request."""
    from jaxinfer import SamplingParams

    first = last = None
    count = 0
    for out in llm.stream(prompt_ids,
                          SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)):
        now = time.perf_counter()
        first = first or now
        last = now
        count += len(out.outputs[0].delta_token_ids)
    return (count - 1) / (last - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=DEFAULT_SERVER)
    p.add_argument("--variants", default="default,int8,int8-w8a8,bf16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    import gguf

    from benchmarks.throughput import machine_description
    from benchmarks.workload import build_workload
    from jaxinfer import LLM
    from jaxinfer.loaders import params_nbytes
    from jaxinfer.registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    path = resolve_model("smollm2-135m")
    print(machine_description(), flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tokenizer = load_tokenizer(path)
    prompt = [t for ids in build_workload(tokenizer.hf, 8, seed=0).prompts for t in ids][:a.prompt_tokens]
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    bw = memory_bandwidth()
    print(f"memory bandwidth: numpy copy {bw['copy']:.1f} GB/s (read + write), numpy sum {bw['read']:.1f} GB/s "
          "(read, one thread)", flush=True)

    engines = {}
    for name in a.variants.split(","):
        llm = LLM(path, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=1024, num_kv_blocks=128,
                  enable_prefix_caching=False, **VARIANTS[name])
        decode_tok_s(llm, prompt, 8)  # compiles the prefill and decode buckets
        packed = llm.engine.core.packed
        note = packed.note if packed is not None and packed.note else ""
        engines[name] = (llm, params_nbytes(llm.engine.runner.params), note)
        print(f"- jaxinfer {name}: {engines[name][1] / 2**20:.1f} MiB of weights. {note}", flush=True)
    server = LlamaServer(a.server, path)
    try:
        server.decode_tok_s(prompt, 8)
        times = {n: [] for n in ["llama.cpp"] + list(engines)}
        for _ in range(a.runs):
            times["llama.cpp"].append(server.decode_tok_s(prompt, a.tokens))
            for name, (llm, _, _) in engines.items():
                times[name].append(decode_tok_s(llm, prompt, a.tokens))
    finally:
        server.close()
    llama = statistics.median(times["llama.cpp"])
    print(f"\nsingle-stream decode, {a.tokens} tokens after a {len(prompt)}-token prompt, median of {a.runs} "
          "interleaved runs")
    print("| engine | weights read per token | decode tok/s (runs) | vs llama.cpp | weight bytes x tok/s | "
          "of numpy copy bandwidth |")
    print("|---|---|---|---|---|---|")
    rows = [("llama.cpp (2 threads)", file_bytes, times["llama.cpp"])]
    rows += [(f"jaxinfer {n}", nbytes, times[n]) for n, (_, nbytes, _) in engines.items()]
    for label, nbytes, runs in rows:
        med = statistics.median(runs)
        rate = nbytes * med / 1e9
        print(f"| {label} | {nbytes / 2**20:.1f} MiB | {med:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | "
              f"{med / llama:.2f}x | {rate:.2f} GB/s | {rate / bw['copy']:.0%} |")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
