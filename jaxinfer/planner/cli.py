"""`jaxinfer plan` and `jaxinfer profile`: `add_plan_args(subparsers)` / `add_profile_args(subparsers)` add the
subcommands to jaxinfer/cli.py's parser."""
from __future__ import annotations

import argparse
import json
import sys


def add_plan_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="memory / roofline plan of a model on a GPU (no weights are read)",
                              description="What a model needs per device (weights, KV pool, activations) and "
                              "its roofline (decode and prefill), with the engine's own arithmetic.")
    p.add_argument("--model", default="llama-3.1-8b",
                   help="preset (configs/models), HF config.json, .gguf, HF dir, orbax checkpoint or registered name")
    p.add_argument("--gpu", default="H100-SXM", help="A100-80G, H100-SXM, H200, B200, MI300X, L4")
    p.add_argument("--memory-gib", type=float, help="custom device: memory in GiB (with --bandwidth-gbs, --tflops)")
    p.add_argument("--bandwidth-gbs", type=float, help="custom device: memory bandwidth in GB/s (1e9 bytes/s)")
    p.add_argument("--tflops", type=float, help="custom device: dense TFLOP/s of --compute-dtype")
    p.add_argument("--interconnect-gbs", type=float, help="custom device: link GB/s, both directions together")
    p.add_argument("--cpu", action="store_true", help="custom device is a CPU (the engine's 2 GiB KV default)")
    p.add_argument("--weight-dtype", default="bfloat16", help="float32, bfloat16, float16, int8, int4")
    p.add_argument("--group-size", type=int, default=128, help="int8/int4: rows per scale (-1: per channel)")
    p.add_argument("--asymmetric", action="store_true", help="int8/int4: f32 offsets stored beside the scales")
    p.add_argument("--scale-dtype", default="float16")
    p.add_argument("--act-order", action="store_true", help="int8/int4: GPTQ act-order row permutation")
    p.add_argument("--dtype", default=None, help="activations (default: float32 with --cpu, else bfloat16)")
    p.add_argument("--kv-cache-dtype", default=None, help="default: the activation dtype")
    p.add_argument("--head-dtype", default=None, help="embedding / LM head (default: wider of weights, dtype)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--context-len", type=int, default=None, help="context of concurrent sequences and decode")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill prompt length (default: context-len)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV budget in GiB, as the engine's")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--allocator-fraction", type=float, default=None,
                   help="share of device memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--batch-sizes", default="1,8,32,128", help="decode batch sizes to tabulate")
    p.add_argument("--compute-dtype", default=None, choices=["bf16", "fp16", "fp8", "fp32"],
                   help="which peak FLOP/s figure to use (default: bf16; fp32 with --cpu)")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--plot", default=None, metavar="PNG", help="also write the memory breakdown and roofline")
    p.set_defaults(fn=cmd_plan)
    return p


def _device(a):
    from jaxinfer.planner.hardware import custom_accelerator

    custom = (a.memory_gib, a.bandwidth_gbs, a.tflops)
    if any(v is not None for v in custom):
        if any(v is None for v in custom):
            raise ValueError("a custom device needs all of --memory-gib, --bandwidth-gbs and --tflops")
        return custom_accelerator(*custom, interconnect_gbs=a.interconnect_gbs, platform="cpu" if a.cpu else "gpu",
                                  name="CPU" if a.cpu else "custom")
    if a.cpu:
        raise ValueError("--cpu describes a custom device: give --memory-gib, --bandwidth-gbs and --tflops")
    return a.gpu


def cmd_plan(a) -> None:
    from jaxinfer.planner import PlanRequest, plan
    from jaxinfer.planner.report import format_table, save_plot

    try:
        batches = tuple(int(b) for b in a.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}") from None
    extra = {} if a.allocator_fraction is None else {"allocator_fraction": a.allocator_fraction}
    req = PlanRequest(
        model=a.model, gpu=_device(a), weight_dtype=a.weight_dtype, group_size=a.group_size,
        symmetric=not a.asymmetric, scale_dtype=a.scale_dtype, act_order=a.act_order, dtype=a.dtype,
        kv_dtype=a.kv_cache_dtype, head_dtype=a.head_dtype, tp=a.tp, pp=a.pp, max_model_len=a.max_model_len,
        context_len=a.context_len, prompt_len=a.prompt_len, block_size=a.block_size,
        kv_cache_memory_fraction=a.kv_cache_memory_fraction, kv_cache_memory_gb=a.kv_cache_memory_gb,
        num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, batch_sizes=batches, compute_dtype=a.compute_dtype,
        **extra)
    result = plan(req)
    print(json.dumps(result, indent=2) if a.format == "json" else format_table(result))
    if a.plot:
        save_plot(result, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)


def add_profile_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="device memory and KV use of the engine over a workload",
                              description="Runs N seeded random requests through the engine and reports peak "
                              "and steady device memory (weights, KV pages, activations / workspace) and KV "
                              "utilisation and fragmentation over time.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--weight-dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="profile a sharded engine (reports the device holding the most)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=128)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-workspace", action="store_true",
                   help="skip compiling the largest step for XLA's buffer assignment")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--plot", default=None, metavar="PNG", help="also write KV utilisation / memory over steps")
    p.set_defaults(fn=cmd_profile)
    return p


def cmd_profile(a) -> None:
    from jaxinfer import LLM
    from jaxinfer.profiler import format_profile, profile_engine, random_requests, save_profile_plot

    llm = LLM(model=a.model, dtype=a.dtype, weight_dtype=a.weight_dtype, max_model_len=a.max_model_len,
              max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
              num_kv_blocks=a.num_kv_blocks, kv_cache_memory_gb=a.kv_cache_memory_gb, block_size=a.block_size,
              tensor_parallel_size=a.tensor_parallel_size, pipeline_parallel_size=a.pipeline_parallel_size)
    engine = llm.engine
    requests = random_requests(engine.config.vocab_size, a.num_requests, seed=a.seed,
                               input_range=(a.min_input, a.max_input), output_range=(a.min_output, a.max_output))
    result = profile_engine(engine, requests, workspace=not a.no_workspace)
    print(json.dumps(result.to_dict(), indent=2) if a.format == "json" else format_profile(result))
    if a.plot:
        save_profile_plot(result, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
