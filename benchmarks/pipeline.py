"""Pipeline parallelism: how much of the stages' time is bubble, measured two ways in one run.

1. Wall clock of one step (random Llama-like model, B decode rows): t_1 on one device (all layers) and t_pp(M)
   with PP stages and M micro-batches. Each stage's useful work is t_1 / PP, so the measured bubble is
   1 - (t_1 / PP) / t_pp(M); the schedule predicts (PP - 1) / (M + PP - 1). Each virtual CPU device gets one
   thread, so the stages really run at once only with PP free cores (the 2-core build machine: PP = 2).
2. The schedule of a real workload: the engine with PP stages serves mixed prefill / decode requests; each
   step's micro-batches give its tick schedule (tick t runs micro-batch t - s on stage s; a tick lasts as long
   as its largest micro-batch, work taken as proportional to tokens), so a step's bubble is
   1 - sum(work) / (PP * sum(tick lengths)), reported over all steps weighted by their length.

    python benchmarks/pipeline.py [--pp 2] [--microbatches 1,2,4,8] [--batch 32] [--runs 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # an uninstalled jaxinfer
os.environ.setdefault("JAXINFER_QUIET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import LLM, SamplingParams, sampler  # noqa: E402
from jaxinfer.batch import SeqChunk  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.loaders.common import random_params  # noqa: E402
from jaxinfer.model_runner import ModelRunner  # noqa: E402
from jaxinfer.sharding import ShardingPlan, make_mesh  # noqa: E402

CONFIG = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                     num_kv_heads=4, head_dim=64, tie_word_embeddings=True, name="bench-8x512")
RUNNER = dict(num_blocks=512, block_size=16, max_num_seqs=64, max_num_batched_tokens=128, max_model_len=256,
              kv_dtype=jnp.float32, attention_backend="xla", matmul_backend="xla", dtype=jnp.float32)


def step_time(runner, batch: int, context: int, runs: int) -> float:
    """Median wall time of one decode step of `batch` rows at `context` tokens (sampler included)."""
    blocks = -(-(context + 1) // RUNNER["block_size"])
    chunks = [SeqChunk([7], context, list(range(i * blocks, (i + 1) * blocks))) for i in range(batch)]
    rows = [sampler.RowInfo(params=SamplingParams(temperature=0.0), seed=0, step=0)] * batch
    runner.execute(chunks, rows)  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.execute(chunks, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_clock(pp: int, microbatches: list[int], batch: int, context: int, runs: int) -> list[dict]:
    params = random_params(CONFIG, jnp.float32, seed=0, scale=0.05)
    t1 = step_time(ModelRunner(CONFIG, params, **RUNNER), batch, context, runs)
    plan = ShardingPlan(CONFIG, make_mesh(1, pp))
    sharded = plan.shard_params(params)
    out = []
    for m in microbatches:
        t = step_time(ModelRunner(CONFIG, sharded, plan=plan, num_microbatches=m, **RUNNER), batch, context, runs)
        out.append(dict(microbatches=m, t1_ms=1e3 * t1, tpp_ms=1e3 * t, measured=1 - t1 / pp / t,
                        schedule=(pp - 1) / (m + pp - 1)))
    return out


def schedule_bubble(pp: int, microbatches: int, num_requests: int) -> dict:
    """Serve a mixed workload through the engine and read each step's micro-batch sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(CONFIG.to_hf_config(), f)
        llm = LLM(f"random:{path}", pipeline_parallel_size=pp, pipeline_microbatches=microbatches,
                  max_num_seqs=32, max_num_batched_tokens=128, max_model_len=256, num_kv_blocks=512,
                  weight_dtype="float32", verbose=False)
    runner, work, span = llm.engine.runner, 0.0, 0.0
    prepare = runner.prepare

    def recording_prepare(chunks, min_tokens=0):
        nonlocal work, span
        batch = prepare(chunks, min_tokens)
        real = batch.mb.slot_mapping < runner.num_blocks * runner.block_size  # padding slots are out of range
        sizes = [int(n) for n in real.sum(axis=1)]
        ticks = [max([sizes[t - s] for s in range(pp) if 0 <= t - s < len(sizes)] + [0])
                 for t in range(len(sizes) + pp - 1)]
        work, span = work + pp * sum(sizes), span + pp * sum(ticks)
        return batch

    runner.prepare = recording_prepare
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, int(rng.integers(8, 120))).tolist() for _ in range(num_requests)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(8, 64)), ignore_eos=True)
              for _ in range(num_requests)]
    llm.generate(prompts, params)
    return dict(pp=pp, microbatches=microbatches, bubble=1 - work / span, predicted=(pp - 1) / (microbatches + pp - 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2, help="stages for the wall-clock table (needs that many cores)")
    p.add_argument("--microbatches", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=96)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--requests", type=int, default=48)
    a = p.parse_args()
    cores = os.cpu_count()
    print(f"machine: {cores} cores, {jax.device_count()} virtual CPU devices, one thread each; "
          f"model {CONFIG.name}: {CONFIG.num_layers} layers, hidden {CONFIG.hidden_size}; "
          f"decode step of {a.batch} rows at context {a.context}, medians of {a.runs} runs\n")
    print(f"1. wall clock, PP={a.pp}")
    print("| micro-batches | 1 device (ms) | PP step (ms) | measured bubble | schedule (PP-1)/(M+PP-1) |")
    print("|---|---|---|---|---|")
    for r in wall_clock(a.pp, [int(m) for m in a.microbatches.split(",")], a.batch, a.context, a.runs):
        print(f"| {r['microbatches']} | {r['t1_ms']:.1f} | {r['tpp_ms']:.1f} | {r['measured']:.2f} | "
              f"{r['schedule']:.2f} |")
    print(f"\n2. tick schedule of a real workload ({a.requests} requests through the engine)")
    print("| PP | micro-batches | bubble (work-weighted) | uniform micro-batches would give |")
    print("|---|---|---|---|")
    for pp, m in ((2, 1), (2, 2), (2, 4), (4, 4), (4, 8)):
        r = schedule_bubble(pp, m, a.requests)
        print(f"| {pp} | {m} | {r['bubble']:.2f} | {r['predicted']:.2f} |")


if __name__ == "__main__":
    main()
