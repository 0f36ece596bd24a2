"""Start-up benchmark: time to ready of the default model, a fresh process per run, split by phase.

Configurations (each run is a new Python process; caches live in a temporary directory):
  cold        empty compilation cache: every executable is traced, lowered, compiled (and stored)
  xla-warm    JAX's persistent XLA cache warm, no executable cache: what a restart cost before the executable
              cache (trace + lower every bucket, XLA compile served from its cache); the store it then does is
              shown separately and left out of "ready"
  warm        both caches warm: executables are deserialised, nothing is traced
  warm-bg     warm, background_warmup=True: ready once the smallest and largest buckets are loaded
  cold-bg     cold, background_warmup=True (the background compile is not waited for)

Columns are medians over the runs: wall (process start to ready, imports included), then the engine's own
split from `stats.snapshot().startup` (see docs/ARCHITECTURE.md, "Start-up"), and the latency of a first
8-token greedy request right after ready. `--per-bucket` also prints each executable's cost in the first run of
the cold and warm configurations.

    python benchmarks/startup.py --per-bucket         # all configurations: 3 warm runs, 1 of each slow one
    python benchmarks/startup.py --configs warm,warm-bg --runs 5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("cold", "xla-warm", "warm", "warm-bg", "cold-bg")
SLOW = ("cold", "xla-warm", "cold-bg")
COLUMNS = ("wall_s", "load_s", "engine_build_s", "trace_s", "lower_s", "compile_s", "executable_load_s",
           "executable_store_s", "warmup_steps_s", "time_to_ready_s", "first_request_s")


def child(args) -> None:
    """One start: build the engine, warm up, report; then time one request."""
    sys.path.insert(0, REPO_ROOT)
    from jaxinfer import LLM, SamplingParams

    llm = LLM(args.model, compilation_cache_dir=args.cache_dir, executable_cache=True,
              background_warmup=args.background, verbose=False)
    llm.warmup()
    startup = llm.engine.stats.snapshot().startup
    print("READY", flush=True)
    start = time.perf_counter()
    llm.generate([[1] * 16], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    first = time.perf_counter() - start
    extra = {}
    if args.background and startup.num_executables_compiled == 0:  # warm: time until every bucket is loaded
        llm.engine.runner.wait_for_warmup()
        extra["all_buckets_ready_s"] = time.perf_counter() - start + startup.time_to_ready_s
    records = [dataclasses.asdict(r) for r in llm.engine.runner.warmup_records]
    line = json.dumps(dict(dataclasses.asdict(startup), first_request_s=first, records=records, **extra))
    print("RESULT " + line, flush=True)
    with open(os.path.join(os.path.dirname(args.cache_dir), "results.jsonl"), "a") as f:  # kept if the parent dies
        f.write(json.dumps({"cache_dir": args.cache_dir, "background": args.background}) + "\t" + line + "\n")
    os._exit(0)  # a cold background warm-up may still be compiling: end without waiting for it


def run_once(config: str, cache_dir: str, model: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--cache-dir", cache_dir, "--model", model]
    if config.endswith("-bg"):
        cmd.append("--background")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXINFER_QUIET="1")
    env.pop("JAXINFER_COMPILATION_CACHE", None)  # it would override --cache-dir
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    wall, result = None, None
    for line in proc.stdout:
        if line.startswith("READY") and wall is None:
            wall = time.perf_counter() - start
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"{config} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    if config == "xla-warm":  # the store only happens because this config has no executable cache to read
        wall -= result["executable_store_s"]
    return dict(result, wall_s=wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--runs", type=int, default=3, help="runs of each warm configuration")
    p.add_argument("--slow-runs", type=int, default=1, help="runs of cold, xla-warm and cold-bg (minutes each)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--per-bucket", action="store_true", help="print each executable's cost (cold and warm)")
    p.add_argument("--json-out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    root = tempfile.mkdtemp(prefix="jaxinfer-startup-")
    warm_dir = os.path.join(root, "warm")  # both caches filled once, read by every warm run
    try:
        for run in range(max(args.runs, args.slow_runs)):
            for config in configs:
                if run >= (args.slow_runs if config in SLOW else args.runs):
                    continue
                cache = os.path.join(root, f"{config}{run}") if config.startswith("cold") else warm_dir
                if config in ("xla-warm", "warm", "warm-bg") and not os.path.isdir(warm_dir):
                    run_once("cold", warm_dir, args.model)  # not reported: it fills both caches
                if config == "xla-warm":  # its run stores the executables again, for the warm configs after it
                    shutil.rmtree(os.path.join(warm_dir, "executables"), ignore_errors=True)
                r = run_once(config, cache, args.model)
                if config == "cold" and not os.path.isdir(warm_dir):
                    os.rename(cache, warm_dir)  # the first cold run's caches serve the warm runs
                elif config.startswith("cold"):
                    shutil.rmtree(cache, ignore_errors=True)
                results[config].append(r)
                print(f"run {run + 1} {config}: ready in {r['wall_s']:.1f} s "
                      f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("| config | runs | " + " | ".join(COLUMNS) + " | executables loaded / compiled |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for config, rs in results.items():
        med = [statistics.median(r[c] for r in rs) for c in COLUMNS]
        counts = f"{rs[0]['num_executables_loaded']} / {rs[0]['num_executables_compiled']}"
        print(f"| {config} | {len(rs)} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {counts} |")
    if args.per_bucket:
        for config in ("cold", "warm"):
            if results.get(config):
                print(f"\nper executable, first {config} run (s):\n")
                print("| executable | source | trace | lower | compile | load | store |\n|---|---|---|---|---|---|---|")
                for rec in results[config][0]["records"]:
                    print(f"| {rec['name']} | {rec['source']} | {rec['trace_s']:.2f} | {rec['lower_s']:.2f} | "
                          f"{rec['compile_s']:.2f} | {rec['load_s']:.2f} | {rec['store_s']:.2f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
