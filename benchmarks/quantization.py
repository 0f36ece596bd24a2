"""The article's quantization table: SmolLM2-135M-Instruct in every weight format jaxinfer runs, on this machine.

Rows: fp32, bf16, int8 (weight-only, per channel), RTN-int4, GPTQ-int4, AWQ-int4 (all three with the same group
size; built here with `jaxinfer quantize` from the fp32 weights, calibrated on WikiText-2 valid), the GGUF Q4_1
file as shipped (run packed), and the same file with the engine's CPU default (which may re-quantize or expand
its layer weights where that is faster here: jaxinfer.quantization.runtime). Columns: weight bytes the engine
holds, single-stream decode tok/s, batched throughput on the offline benchmark's workload
(benchmarks/workload.py), WikiText-2 test perplexity (HF's sliding-window recipe through the engine,
jaxinfer.evaluate) and its change against fp32.

There is no float checkpoint of SmolLM2-135M here: "fp32" is the shipped Q4_1 GGUF dequantized to f32, so the
4-bit rows *re*-quantize weights that already sit on a 4-bit grid (Q4_1: groups of 32, f16 scale and minimum).

    python benchmarks/quantization.py                       # everything (quantizes once into --work-dir)
    python benchmarks/quantization.py --rows fp32,gptq4 --ppl-tokens 4096 --num-requests 8   # quick look

Each quantized checkpoint is loaded by `jaxinfer.loaders` kept packed (`quantization="packed"`), and runs through
the XLA formulations the engine picks on this CPU; the "path" column says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # so `benchmarks.*` and an uninstalled `jaxinfer` import

from benchmarks.workload import DEFAULT_DATA_PATH, build_workload  # noqa: E402

DATA_DIR = os.path.dirname(DEFAULT_DATA_PATH)
ROWS = ("fp32", "int8", "rtn4", "gptq4", "awq4", "q4_1-default", "bf16", "q4_1")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    name: str
    label: str
    quantize: dict | None = None  # QuantizeSettings fields: the row is a checkpoint made by `jaxinfer quantize`
    weight_dtype: str | None = None
    quantization: str | None = None  # the engine's option (jaxinfer.quantization.on_load)


def row_specs(group_size: int, calib: str, num_samples: int, seq_len: int) -> dict[str, RowSpec]:
    cal = dict(calib=calib, num_samples=num_samples, seq_len=seq_len)
    g = group_size
    return {
        "fp32": RowSpec("fp32", "fp32 (Q4_1 GGUF dequantized)", weight_dtype="float32"),
        "bf16": RowSpec("bf16", "bf16", weight_dtype="bfloat16"),
        "int8": RowSpec("int8", "int8 weight-only (per channel, RTN)", dict(method="rtn", bits=8, group_size=-1),
                        "float32", "packed"),
        "rtn4": RowSpec("rtn4", f"RTN-int4 g{g}", dict(method="rtn", bits=4, group_size=g), "float32", "packed"),
        "gptq4": RowSpec("gptq4", f"GPTQ-int4 g{g}", dict(method="gptq", bits=4, group_size=g, **cal), "float32",
                         "packed"),
        "awq4": RowSpec("awq4", f"AWQ-int4 g{g}", dict(method="awq", bits=4, group_size=g, **cal), "float32",
                        "packed"),
        "q4_1": RowSpec("q4_1", "GGUF Q4_1 as shipped (g32; tied head Q8_0)", quantization="packed"),
        "q4_1-default": RowSpec("q4_1-default", "GGUF Q4_1, the engine's CPU default"),
    }


@dataclasses.dataclass
class RowResult:
    row: str
    label: str
    path: str = ""
    weight_bytes: int = 0
    packed_weights: int = 0
    decode_tok_s: float | None = None
    decode_runs: list = dataclasses.field(default_factory=list)
    throughput_tok_s: float | None = None
    throughput_wall_s: float | None = None
    perplexity: float | None = None
    ppl_tokens: int = 0
    quantize_s: float | None = None
    error: str = ""


# ------------------------------------------------------------------------------------------ preparing rows

def checkpoint_dir(work_dir: str, spec: RowSpec) -> str:
    q = spec.quantize
    tag = "-".join(f"{k}{v}" for k, v in sorted(q.items()) if k != "calib")
    return os.path.join(work_dir, f"{spec.name}-{tag}")


def prepare_checkpoint(work_dir: str, spec: RowSpec) -> tuple[str, float | None]:
    """The row's HF checkpoint, quantized now unless an earlier run left it in work_dir."""
    from jaxinfer.quantization.pipeline import QuantizeSettings, quantize_checkpoint

    dst = checkpoint_dir(work_dir, spec)
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst, None
    start = time.perf_counter()
    quantize_checkpoint("smollm2-135m", dst, QuantizeSettings(**spec.quantize), overwrite=True)
    return dst, time.perf_counter() - start


def engine_source(spec: RowSpec, hf_dir: str | None) -> tuple[str, str]:
    """(model source for LLM, how it is loaded)."""
    if hf_dir is None:
        return "smollm2-135m", "GGUF loader"
    return hf_dir, "HF GPTQ/AWQ loader"


# ------------------------------------------------------------------------------------------------ measuring

def measure_row(spec: RowSpec, source: str, path: str, args, ppl_ids, workload) -> RowResult:
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.evaluate import perplexity
    from jaxinfer.loaders.common import params_nbytes
    from jaxinfer.quantization.weight import packing_of

    res = RowResult(spec.name, spec.label, path)
    max_len = max(args.context + 1, workload.max_total_len + 1)
    llm = LLM(source, weight_dtype=spec.weight_dtype, quantization=spec.quantization, max_num_seqs=args.max_num_seqs,
              max_model_len=max_len, max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    params = llm.engine.runner.params
    res.weight_bytes = params_nbytes(params)
    res.packed_weights = len(packing_of(params))
    packed = llm.engine.core.packed
    if res.packed_weights:
        res.path += f"; {packed.note}" if packed is not None and packed.note else "; packed"
    else:
        res.path += f"; float {jax_dtype_name(params)}"
    if not args.skip_speed:
        # No full warm-up (it compiles every bucket: minutes a row on this machine); instead one untimed run of
        # each measurement first, which compiles the buckets that measurement uses.
        prompt = [t for p in workload.prompts for t in p][:128]
        _decode_tok_s(llm, prompt, 8)
        for _ in range(args.decode_runs):
            res.decode_runs.append(_decode_tok_s(llm, prompt, args.decode_tokens))
        res.decode_tok_s = statistics.median(res.decode_runs)
        params_list = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
        for _ in range(2):  # the second run is timed
            start = time.perf_counter()
            llm.generate(workload.prompts, params_list)
            res.throughput_wall_s = time.perf_counter() - start
        res.throughput_tok_s = workload.num_output_tokens / res.throughput_wall_s
    if ppl_ids is not None:
        result = perplexity(llm, ppl_ids, args.context, args.stride)
        res.perplexity, res.ppl_tokens = result.perplexity, result.num_scored
        print(f"[{spec.name}] {result}", flush=True)
    del llm
    gc.collect()
    return res


def jax_dtype_name(params) -> str:
    import jax.numpy as jnp

    return jnp.dtype(params["layers_0"]["wq"].dtype).name


def _decode_tok_s(llm, prompt, n: int) -> float:
    """Tokens after the first / time after the first, streaming one greedy request."""
    from jaxinfer import SamplingParams

    first = last = None
    count = 0
    for out in llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)):
        now = time.perf_counter()
        first = first or now
        last = now
        count += len(out.outputs[0].delta_token_ids)
    return (count - 1) / (last - first)


# -------------------------------------------------------------------------------------------------- report

def table(results: list[RowResult], args) -> str:
    ref = next((r.perplexity for r in results if r.row == "fp32" and r.perplexity), None)
    lines = ["| format | weight bytes in the engine | single-stream decode tok/s | batched output tok/s | "
             f"perplexity (WikiText-2 test, {results[0].ppl_tokens if results else 0} tokens) | vs fp32 | path |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | – | – | – | – | – | failed: {r.error} |")
            continue
        delta = f"{(r.perplexity / ref - 1) * 100:+.2f}%" if ref and r.perplexity else "–"
        fmt = lambda v, f: f"{v:{f}}" if v is not None else "–"  # noqa: E731
        lines.append(f"| {r.label} | {r.weight_bytes / 2**20:.1f} MiB | {fmt(r.decode_tok_s, '.1f')} | "
                     f"{fmt(r.throughput_tok_s, '.1f')} | {fmt(r.perplexity, '.3f')} | {delta} | {r.path} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--work-dir", default=os.path.expanduser("~/.cache/jaxinfer/quantization-benchmark"),
                   help="where the quantized checkpoints are written (and reused by later runs)")
    p.add_argument("--group-size", type=int, default=64,
                   help="int4 group size (SmolLM2-135M's hidden size 576 is not a multiple of 128)")
    p.add_argument("--calib", default=os.path.join(DATA_DIR, "valid.txt"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--ppl-data", default=os.path.join(DATA_DIR, "test.txt"))
    p.add_argument("--ppl-tokens", type=int, default=8192, help="score the first N tokens of the test set "
                                                                 "(0: all of it)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=32, help="batched workload size (the offline benchmark "
                                                                "runs 64)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-runs", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true", help="perplexity and bytes only")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from benchmarks.throughput import machine_description
    from jaxinfer.evaluate import read_tokens
    from jaxinfer.registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    print(machine_description(), flush=True)
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    specs = row_specs(args.group_size, args.calib, args.calib_samples, args.calib_len)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(specs)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    ppl_ids = None if args.skip_ppl else read_tokens(tokenizer, args.ppl_data, args.ppl_tokens or None)
    workload = build_workload(tokenizer.hf, args.num_requests, seed=0)
    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    for name in rows:
        spec = specs[name]
        try:
            hf_dir, seconds = prepare_checkpoint(args.work_dir, spec) if spec.quantize else (None, None)
            source, path = engine_source(spec, hf_dir)
            res = measure_row(spec, source, path, args, ppl_ids, workload)
            res.quantize_s = seconds
        except Exception as e:  # one failing row must not lose the others
            import traceback

            traceback.print_exc()
            res = RowResult(name, spec.label, error=f"{type(e).__name__}: {e}")
        results.append(res)
        print(table(results, args), flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"perplexity: first {args.ppl_tokens or 'all'} tokens of {args.ppl_data}, context {args.context}, "
          f"stride {args.stride}; batched: {workload.summary()}, max_num_seqs {args.max_num_seqs}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, second of two runs; decode: "
          f"{args.decode_tokens} tokens after a 128-token prompt, median of {args.decode_runs}")
    print("\n" + table(results, args))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
