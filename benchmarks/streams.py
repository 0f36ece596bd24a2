"""Inter-token latency of many concurrent streams through AsyncEngine (client side: one asyncio loop, all requests
sent at once), the engine thread's step rate, and the CPU time the engine thread and the caller's thread (the
asyncio loop) spend per step, for a given jaxinfer source tree.

    python benchmarks/streams.py                              # this checkout's jaxinfer
    python benchmarks/streams.py --jaxinfer-src /work/main    # another checkout's (e.g. before a change)

Each run sends the same seeded workload (short WikiText prompts, greedy, exact output lengths with ignore_eos);
the first run compiles whatever buckets the workload's steps use and is not timed. Prefix caching is off, so
repeated runs redo their prefill. Prints one JSON line (`--json`) or a markdown row per timed run and their
medians.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # so `benchmarks.*` and an uninstalled `jaxinfer` import

from benchmarks.workload import StreamTiming, build_workload, load_tokenizer, summarize_streams  # noqa: E402


async def _stream(engine, prompt, params) -> StreamTiming:
    start = time.perf_counter()
    times, tokens = [], []
    async for out in engine.generate(prompt, params):
        n = len(out.outputs[0].delta_token_ids)
        if n:
            times.append(time.perf_counter())
            tokens.append(n)
    return StreamTiming(start, tuple(times), tuple(tokens))


def thread_cpu_seconds(native_id: int) -> float:
    """CPU time a thread of this process has used (Linux schedstat), readable from any thread. Unlike wall time
    it hardly moves with the machine's load, so it shows where the host work runs."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def run_once(engine, workload, sampling_params_cls) -> dict:
    params = [sampling_params_cls(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    steps_before = engine.metrics()["num_steps"]
    threads = {"engine": engine._thread.native_id, "caller": threading.get_native_id()}
    cpu_before = {k: thread_cpu_seconds(t) for k, t in threads.items()}

    async def main():
        return await asyncio.gather(*(_stream(engine, p, sp) for p, sp in zip(workload.prompts, params)))

    start = time.perf_counter()
    timings = asyncio.run(main())
    wall = time.perf_counter() - start
    steps = engine.metrics()["num_steps"] - steps_before
    cpu = {k: thread_cpu_seconds(t) - cpu_before[k] for k, t in threads.items()}
    wrong = [t.num_tokens for t, n in zip(timings, workload.output_lens) if t.num_tokens != n]
    if wrong:
        raise RuntimeError(f"{len(wrong)} streams returned the wrong number of tokens")
    s = summarize_streams(timings)
    return dict(wall_s=wall, steps=steps, step_ms=1000 * wall / steps,
                output_tok_s=workload.num_output_tokens / wall,
                itl_p50_ms=1000 * s["itl"]["p50"], itl_p90_ms=1000 * s["itl"]["p90"],
                itl_p99_ms=1000 * s["itl"]["p99"], tpot_ms=1000 * s["tpot"]["p50"],
                ttft_p50_ms=1000 * s["ttft"]["p50"],
                engine_thread_cpu_ms_per_step=1000 * cpu["engine"] / steps,
                caller_thread_cpu_ms_per_step=1000 * cpu["caller"] / steps,
                multi_token_chunks=sum(n > 1 for t in timings for n in t.chunk_tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jaxinfer-src", default=None, help="import jaxinfer from this source tree (default: this one)")
    p.add_argument("--label", default=None, help="name of this row (default: the jaxinfer source directory)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    p.add_argument("--runs", type=int, default=3, help="timed runs (medians reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of markdown")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval (seconds) for the run; Python's default is 0.005")
    a = p.parse_args()
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    if a.jaxinfer_src:
        sys.path.insert(0, os.path.abspath(a.jaxinfer_src))  # after `benchmarks` was imported from this tree

    import jax

    import jaxinfer
    from jaxinfer import SamplingParams
    from jaxinfer.async_engine import AsyncEngine

    src = os.path.dirname(os.path.dirname(os.path.abspath(jaxinfer.__file__)))
    label = a.label or src
    workload = build_workload(load_tokenizer(), a.streams, a.seed, prompt_len_range=tuple(a.prompt_len),
                              output_len_range=tuple(a.output_len))
    engine = AsyncEngine(model="smollm2-135m", max_num_seqs=a.streams, enable_prefix_caching=False, verbose=False)
    try:
        run_once(engine, workload, SamplingParams)  # compiles the buckets these steps use
        rows = [run_once(engine, workload, SamplingParams) for _ in range(a.runs)]
    finally:
        engine.shutdown()
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    info = dict(label=label, jaxinfer_src=src, switch_interval=sys.getswitchinterval(), device=jax.devices()[0].device_kind, cores=len(os.sched_getaffinity(0)),
                workload=workload.summary(), load_average=os.getloadavg()[0], runs=rows, median=median)
    if a.json:
        print(json.dumps(info))
        return
    print(f"{label}: {info['workload']}; {info['device']}, {info['cores']} cores, load {info['load_average']:.1f}\n")
    cols = list(rows[0])
    print("| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for i, r in enumerate(rows + [median]):
        name = "median" if i == len(rows) else str(i + 1)
        print(f"| {name} | " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
