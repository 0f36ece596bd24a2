"""Where a throughput run's time goes: jaxinfer alone on the throughput workload, with each engine step split
into host work (schedule, batch build, dispatch) and the wait for the device, and device time per token bucket.

    python benchmarks/step_profile.py [--max-num-seqs 64] [--num-requests 64] [--weight-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # so `benchmarks.*` and an uninstalled `jaxinfer` import

import jax  # noqa: E402

from benchmarks.workload import build_workload, load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--weight-dtype", default=None, choices=(None, "bfloat16", "float32"))
    a = p.parse_args()
    from jaxinfer import LLM, SamplingParams, sampler

    workload = build_workload(load_tokenizer(), num_requests=a.num_requests, seed=0)
    llm = LLM(model="smollm2-135m", max_num_seqs=a.max_num_seqs, enable_prefix_caching=False,
              weight_dtype=a.weight_dtype, verbose=False)
    llm.warmup()
    runner = llm.engine.runner
    seconds, steps = collections.defaultdict(float), collections.Counter()
    last_bucket = [0]

    def timed(owner, name: str, part: str):
        """Wrap owner.name so its wall time adds to seconds[part]."""
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds[part] += time.perf_counter() - start
            if name == "prepare":
                last_bucket[0] = out.num_tokens
            elif name == "execute":
                steps[last_bucket[0]] += 1
                seconds[last_bucket[0]] += time.perf_counter() - start
            return out

        setattr(owner, name, wrapper)

    timed(llm.engine.scheduler, "schedule", "schedule")
    timed(runner, "prepare", "batch build")
    timed(sampler, "make_sampling_tensors", "batch build")
    timed(runner, "_forward", "dispatch")
    timed(runner, "_sample", "dispatch")
    timed(runner, "execute", "step")  # the rest of a step: the wait for the device and the copy back
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    llm.generate(workload.prompts, params)
    wall = time.perf_counter() - start
    seconds["device wait"] = seconds["step"] - seconds["batch build"] - seconds["dispatch"]
    parts = ("schedule", "batch build", "dispatch", "device wait")
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; max_num_seqs {a.max_num_seqs}, "
          f"weights {llm.engine.runner.params['final_norm'].dtype}")
    print(f"wall {wall:.1f} s, {workload.num_output_tokens / wall:.1f} useful output tok/s, "
          f"{sum(steps.values())} steps\n")
    print("| part | seconds | share |\n|---|---|---|")
    for name in parts:
        print(f"| {name} | {seconds[name]:.2f} | {seconds[name] / wall:.1%} |")
    other = wall - sum(seconds[n] for n in parts)
    print(f"| other host (outputs, detokenize, stops) | {other:.2f} | {other / wall:.1%} |\n")
    print("| token bucket | steps | ms/step (runner.execute) |\n|---|---|---|")
    for bucket in sorted(steps):
        print(f"| {bucket} | {steps[bucket]} | {1000 * seconds[bucket] / steps[bucket]:.1f} |")


if __name__ == "__main__":
    main()
