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
    runner, scheduler = llm.engine.runner, llm.engine.scheduler
    seconds, steps = collections.defaultdict(float), collections.Counter()
    execute, schedule = runner.execute, scheduler.schedule

    def timed_execute(chunks, rows, prompt_targets=None, min_tokens=0):
        # The runner's execute (this workload asks for no prompt log-probs), timed between its phases.
        start = time.perf_counter()
        batch = runner.prepare(chunks, min_tokens)
        tensors, flags = sampler.make_sampling_tensors(rows, batch.logits_indices.shape[0], runner.config.vocab_size)
        built = time.perf_counter()
        (logits, _), runner.kv_cache = runner._forward(runner.params, runner.kv_cache, batch, None)
        out = runner._sample(logits, tensors, flags=flags, eos_token_ids=runner.eos_token_ids)
        dispatched = time.perf_counter()
        result = jax.device_get((out, None))
        done = time.perf_counter()
        seconds["batch build"] += built - start
        seconds["dispatch"] += dispatched - built
        seconds["device wait"] += done - dispatched
        steps[batch.num_tokens] += 1
        seconds[batch.num_tokens] += done - built
        return result

    def timed_schedule():
        start = time.perf_counter()
        out = schedule()
        seconds["schedule"] += time.perf_counter() - start
        return out

    runner.execute, scheduler.schedule = timed_execute, timed_schedule
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    llm.generate(workload.prompts, params)
    wall = time.perf_counter() - start
    runner.execute, scheduler.schedule = execute, schedule
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
    print("| token bucket | steps | ms/step (dispatch + device) |\n|---|---|---|")
    for bucket in sorted(steps):
        print(f"| {bucket} | {steps[bucket]} | {1000 * seconds[bucket] / steps[bucket]:.1f} |")


if __name__ == "__main__":
    main()
