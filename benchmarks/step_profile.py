"""Where a throughput run's time goes: jaxinfer alone on the throughput workload, with async scheduling (one step
in flight) and with synchronous steps, in the same run. For each: the time the host spends in each part of a
step, the time it waits for the device, and device milliseconds per step for each token bucket.

    python benchmarks/step_profile.py [--max-num-seqs 64] [--num-requests 64] [--modes async,sync]

With async scheduling the host work overlaps the device, so what matters is the wait share: the rest of the
wall time is host work the device waited for.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # so `benchmarks.*` and an uninstalled `jaxinfer` import

import jax  # noqa: E402

from benchmarks.workload import build_workload, load_tokenizer  # noqa: E402

from jaxinfer.stats import STEP_PARTS as PARTS  # noqa: E402  (schedule, batch build, dispatch, device wait)


def profile(mode: str, workload, max_num_seqs: int, weight_dtype, runs: int) -> dict:
    from jaxinfer import LLM, SamplingParams

    llm = LLM(model="smollm2-135m", max_num_seqs=max_num_seqs, enable_prefix_caching=False,
              weight_dtype=weight_dtype, async_scheduling=mode == "async", verbose=False)
    llm.warmup()
    stats = llm.engine.stats  # the engine's own per-step timings (jaxinfer/stats.py)
    bucket_ms = collections.defaultdict(list)
    unsubscribe = stats.add_step_listener(lambda step: bucket_ms[step.bucket].append(1000 * step.device_s))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    walls = []
    for _ in range(runs):
        bucket_ms.clear()
        before = stats.snapshot().host_seconds
        start = time.perf_counter()
        llm.generate(workload.prompts, params)
        walls.append(time.perf_counter() - start)
        after = stats.snapshot().host_seconds
    unsubscribe()
    seconds = {p: after[p] - before[p] for p in PARTS}
    wall = walls[-1]
    other = wall - sum(seconds.values())
    return dict(mode=mode, wall=statistics.median(walls), walls=walls, last_wall=wall,
                shares={**{p: seconds[p] / wall for p in PARTS}, "other host": other / wall},
                seconds={**seconds, "other host": other},
                bucket_ms={b: statistics.median(v) for b, v in bucket_ms.items()},
                bucket_steps={b: len(v) for b, v in bucket_ms.items()},
                weights=str(llm.engine.runner.params["final_norm"].dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--weight-dtype", default=None, choices=(None, "bfloat16", "float32"))
    p.add_argument("--modes", default="async,sync", help="comma list of async, sync")
    p.add_argument("--runs", type=int, default=3, help="timed runs per mode (median reported)")
    a = p.parse_args()

    workload = build_workload(load_tokenizer(), num_requests=a.num_requests, seed=0)
    results = [profile(m, workload, a.max_num_seqs, a.weight_dtype, a.runs) for m in a.modes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; max_num_seqs {a.max_num_seqs}, "
          f"weights {results[0]['weights']}, {a.num_requests} requests, {workload.num_output_tokens} output "
          f"tokens; load average {os.getloadavg()[0]:.1f}\n")
    print("| mode | wall s (median of runs) | runs | useful output tok/s |\n|---|---|---|---|")
    for r in results:
        runs = ", ".join(f"{w:.1f}" for w in r["walls"])
        print(f"| {r['mode']} | {r['wall']:.1f} | {runs} | {workload.num_output_tokens / r['wall']:.1f} |")
    print("\nShare of the last run's wall time (async: host parts overlap the device; the wall time is the wait "
          "plus the host work the device waited for):\n")
    print("| part | " + " | ".join(r["mode"] for r in results) + " |\n|---|" + "---|" * len(results))
    for part in (*PARTS, "other host"):
        cells = " | ".join(f"{r['seconds'][part]:.2f} s ({r['shares'][part]:.1%})" for r in results)
        print(f"| {part} | {cells} |")
    print("\n| token bucket | steps | " + " | ".join(f"{r['mode']} device ms/step" for r in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for bucket in sorted(results[0]["bucket_ms"]):
        cells = " | ".join(f"{r['bucket_ms'].get(bucket, float('nan')):.1f}" for r in results)
        print(f"| {bucket} | {results[0]['bucket_steps'][bucket]} | {cells} |")


if __name__ == "__main__":
    main()
