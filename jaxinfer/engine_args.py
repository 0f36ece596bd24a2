"""EngineArgs: every engine option in one place, and the command-line flags made from it.

Each field carries its help text (and choices, lower bound) as dataclass metadata. `add_argparse_flags` (the
`jaxinfer` CLI) and `define_absl_flags` (the server launcher) derive their flags from it, with the field's type,
default, help and choices, so no flag list is kept by hand anywhere. argparse flags are the field names with
dashes (`--max-num-seqs`; booleans `--enable-prefix-caching` / `--no-enable-prefix-caching`); absl flags keep the
underscores (`--max_num_seqs`; booleans `--enable_prefix_caching` / `--noenable_prefix_caching`, absl's form).

Light on purpose (no jax): a launcher defines its flags before it imports the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from jaxinfer.registry import DEFAULT_MODEL

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATION_MODES = ("packed", "dequantize", "int8", "int4", "int4-g64", "int4-g32")  # jaxinfer.quantization.on_load


def _opt(default, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
         exclusive_minimum: bool = False):
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "minimum": minimum, "exclusive_minimum": exclusive_minimum})


@dataclasses.dataclass
class EngineArgs:
    model: str = _opt(DEFAULT_MODEL, "registered model name, .gguf file, HF model directory or orbax checkpoint")
    tokenizer: str | None = _opt(None, "tokenizer to use (a HF directory or .gguf file); default: the model's own")
    dtype: str | None = _opt(None, "activation dtype; default: float32 on CPU, bfloat16 on GPU/TPU", choices=DTYPES)
    weight_dtype: str | None = _opt(
        None, "stored weight dtype; default: bfloat16 on GPU/TPU, on CPU the faster of bfloat16 and float32 on "
        "this machine (measured once, cached); float32 for bit-level parity with HF fp32", choices=DTYPES)
    quantization: str | None = _opt(
        None, "packed (quantized) weights: default keeps a checkpoint's packing (GGUF Q4_0/Q4_1/Q8_0, GPTQ, AWQ) "
        "where it runs at least as fast as float weights here (always on GPU), unless weight_dtype is given; "
        "packed: always keep it; dequantize: expand to float; int8 (per channel) / int4 (groups of 128; "
        "int4-g64, int4-g32) quantize the layer weights on load", choices=QUANTIZATION_MODES)
    kv_cache_dtype: str | None = _opt(None, "KV cache dtype; default: the activation dtype", choices=DTYPES)
    block_size: int = _opt(16, "tokens per KV cache block", minimum=1)
    num_kv_blocks: int | None = _opt(None, "number of KV cache blocks; overrides the memory budget", minimum=1)
    kv_cache_memory_gb: float | None = _opt(
        None, "KV cache budget per device in GiB; default: 2 GiB in all on CPU, kv_cache_memory_fraction of free "
        "accelerator memory",
        minimum=0, exclusive_minimum=True)
    kv_cache_memory_fraction: float = _opt(
        0.9, "fraction of the accelerator memory the weights leave free that the KV cache may take",
        minimum=0, exclusive_minimum=True)
    max_model_len: int | None = _opt(None, "longest sequence (prompt + output); default: min(model context, 2048)",
                                     minimum=2)
    max_num_seqs: int = _opt(128, "most sequences running at once", minimum=1)
    max_num_batched_tokens: int = _opt(512, "most tokens per model step (largest token bucket)", minimum=1)
    enable_prefix_caching: bool = _opt(True, "reuse the KV blocks of prompt prefixes seen before")
    enable_chunked_prefill: bool = _opt(True, "split long prompts into chunks that share steps with decodes")
    scheduler_policy: str = _opt(
        "continuous", "continuous batching, or static (admit a batch only when the previous one finished: a "
        "benchmark baseline)", choices=("continuous", "static"))
    async_scheduling: bool | None = _opt(
        None, "launch step N+1 before reading step N's tokens (one step in flight); off: synchronous steps; "
        "default: on for GPU/TPU, off on CPU, where the host's work and XLA's compute share the same cores (the "
        "overlap bought no throughput there and cost time to first token: benchmarks/RESULTS.md, 'Serving')")
    attention_backend: str | None = _opt(None, "attention implementation; default: pallas on GPU, xla elsewhere",
                                         choices=("xla", "pallas", "pallas_interpret", "reference"))
    matmul_backend: str | None = _opt(
        None, "quantized matmul implementation; default: pallas on GPU, xla elsewhere (an exact XLA formulation "
        "per row count, measured once per CPU); xla_w8a8 also lets it quantize activations to int8 (faster "
        "int8 x int8 dots on CPU, outputs differ)", choices=("xla", "xla_w8a8", "pallas", "pallas_interpret"))
    compilation_cache_dir: str | None = _opt(
        None, "persistent XLA compilation cache; default: ~/.cache/jaxinfer/xla (env JAXINFER_COMPILATION_CACHE)")
    executable_cache: bool = _opt(
        True, "keep compiled step executables on disk (under the compilation cache dir) and load them at warm-up "
        "instead of tracing and compiling (a restart is ready in a fraction of the time)")
    background_warmup: bool = _opt(
        False, "warmup() makes only the smallest and largest token buckets ready and loads or compiles the others "
        "on a background thread while serving (each step takes the smallest ready bucket that fits)")
    max_waiting_requests: int = _opt(
        4096, "admission control: refuse new requests (QueueFullError) while this many sequences wait", minimum=0)
    max_waiting_prompt_tokens: int | None = _opt(
        None, "admission control: refuse new requests (QueueFullError) while the prompts not yet scheduled "
        "hold this many tokens; default: unlimited", minimum=1)
    verbose: bool = _opt(True, "print load and KV cache information and progress bars")
    # Scale-out (docs/PARALLELISM.md): a (pipe, tensor) mesh over tp * pp devices, of one or several processes.
    tensor_parallel_size: int = _opt(1, "Megatron tensor parallelism: devices that split heads, MLP and vocabulary",
                                     minimum=1)
    pipeline_parallel_size: int = _opt(1, "pipeline parallelism: stages of contiguous layers", minimum=1)
    pipeline_microbatches: int | None = _opt(
        None, "micro-batches per step with pipeline stages; default: one per stage", minimum=1)
    coordinator_address: str | None = _opt(
        None, "multi-host: host:port of process 0 (jax.distributed); every process runs the same command")
    num_processes: int = _opt(1, "multi-host: how many processes the run spans", minimum=1)
    process_id: int = _opt(0, "multi-host: this process's index; process 0 schedules, the others follow its steps",
                           minimum=0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))


def _check(f: dataclasses.Field, value) -> None:
    kind, nullable = _field_type(f)
    if value is None:
        if not nullable:
            raise ValueError(f"EngineArgs.{f.name} must not be None")
        return
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int)
                                                                    and not isinstance(value, bool)))
    if not ok:
        raise ValueError(f"EngineArgs.{f.name} must be {kind.__name__}{' or None' if nullable else ''}, "
                         f"got {value!r}")
    choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
    if choices and value not in choices:
        raise ValueError(f"EngineArgs.{f.name} must be one of {', '.join(choices)}, got {value!r}")
    if minimum is not None:
        exclusive = f.metadata.get("exclusive_minimum")
        if value < minimum or (exclusive and value == minimum):
            raise ValueError(f"EngineArgs.{f.name} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")


_TYPE_HINTS: dict[str, Any] = {}


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(bool | int | float | str, whether None is allowed), from the annotation."""
    if not _TYPE_HINTS:
        _TYPE_HINTS.update(typing.get_type_hints(EngineArgs))
    hint = _TYPE_HINTS[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    kinds = [a for a in args if a is not type(None)]
    assert len(kinds) == 1 and kinds[0] in (bool, int, float, str), f"unsupported EngineArgs type {hint}"
    return kinds[0], len(kinds) != len(args)


def _help(f: dataclasses.Field) -> str:
    return f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")


# ------------------------------------------------------------------------------------------------ argparse

def _on_off(default: bool | None) -> str:
    return "auto" if default is None else "on" if default else "off"


def add_argparse_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, **defaults) -> None:
    """Add one flag per EngineArgs field. `defaults` overrides a field's default for this parser (a command that
    wants e.g. `verbose=False`)."""
    for f in dataclasses.fields(EngineArgs):
        kind, _ = _field_type(f)
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{f.metadata['help']} (default: {_on_off(default)})")
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"], help=_help(f))


def engine_args_from_namespace(namespace: argparse.Namespace, **overrides) -> EngineArgs:
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------- absl

def define_absl_flags(flag_values=None) -> list[str]:
    """Define one absl flag per EngineArgs field in `flag_values` (default: absl.flags.FLAGS). Returns the
    flag names."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    for f in dataclasses.fields(EngineArgs):
        kind, _ = _field_type(f)
        choices = f.metadata["choices"]
        if kind is bool:
            flags.DEFINE_boolean(f.name, f.default, f.metadata["help"], flag_values=fv)
        elif choices:
            flags.DEFINE_enum(f.name, f.default, list(choices), _help(f), flag_values=fv)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, _help(f), lower_bound=f.metadata["minimum"], flag_values=fv)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, _help(f), flag_values=fv)
        else:
            flags.DEFINE_string(f.name, f.default, _help(f), flag_values=fv)
    return [f.name for f in dataclasses.fields(EngineArgs)]


def engine_args_from_absl(flag_values=None, **overrides) -> EngineArgs:
    """EngineArgs from parsed absl flags (those `define_absl_flags` defined)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    values = {f.name: fv[f.name].value for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{**values, **overrides})
