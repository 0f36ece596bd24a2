"""Engine options have one source: the CLI's argparse flags and the launcher's absl flags are derived from
EngineArgs's fields (type, default, help, choices), and parse back into the same EngineArgs."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
from absl import flags

from jaxinfer.cli import build_parser
from jaxinfer.engine_args import (EngineArgs, add_argparse_flags, define_absl_flags, engine_args_from_absl,
                                  engine_args_from_namespace)

FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}
# One non-default value per field, of the field's type (a choice where there are choices).
CHANGED = dict(model="/tmp/model.gguf", tokenizer="/tmp/tok", dtype="bfloat16", weight_dtype="float32",
               quantization="int4-g64", kv_cache_dtype="float16", block_size=32, num_kv_blocks=99,
               kv_cache_memory_gb=1.5,
               kv_cache_memory_fraction=0.5, max_model_len=1024, max_num_seqs=7, max_num_batched_tokens=256,
               enable_prefix_caching=False, enable_chunked_prefill=False, scheduler_policy="static",
               async_scheduling=False, attention_backend="reference", matmul_backend="pallas_interpret",
               compilation_cache_dir="/tmp/xla", max_waiting_requests=10, max_waiting_prompt_tokens=5000,
               verbose=False, tensor_parallel_size=4, pipeline_parallel_size=2, pipeline_microbatches=3,
               coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1, background_warmup=True,
               executable_cache=False)


def test_changed_values_cover_every_field():
    assert set(CHANGED) == set(FIELDS)
    assert all(CHANGED[name] != f.default for name, f in FIELDS.items())


def _argv_dashes(values: dict) -> list[str]:
    argv = []
    for name, v in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv


def test_argparse_defaults_and_every_flag_round_trip():
    p = argparse.ArgumentParser()
    add_argparse_flags(p)
    assert engine_args_from_namespace(p.parse_args([])) == EngineArgs()
    assert engine_args_from_namespace(p.parse_args(_argv_dashes(CHANGED))) == EngineArgs(**CHANGED)
    # Booleans go both ways.
    assert engine_args_from_namespace(p.parse_args(["--no-async-scheduling", "--async-scheduling"])).async_scheduling


def test_argparse_help_and_choices_come_from_the_fields():
    p = argparse.ArgumentParser()
    add_argparse_flags(p)
    actions = {a.dest: a for a in p._actions if a.dest in FIELDS}
    assert set(actions) == set(FIELDS)
    for name, f in FIELDS.items():
        assert actions[name].help.startswith(f.metadata["help"])
        assert (tuple(actions[name].choices) if actions[name].choices else None) == f.metadata["choices"]
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "float64"])
    with pytest.raises(SystemExit):
        p.parse_args(["--max-num-seqs", "many"])


def test_cli_commands_expose_every_engine_flag():
    parser = build_parser()
    a = parser.parse_args(["generate", *_argv_dashes(CHANGED), "--max-tokens", "5", "hello"])
    assert engine_args_from_namespace(a) == EngineArgs(**CHANGED)
    assert a.prompt == "hello" and a.max_tokens == 5
    b = parser.parse_args(["bench", "throughput", "--scheduler-policy", "static", "--num-requests", "3"])
    assert engine_args_from_namespace(b) == EngineArgs(scheduler_policy="static")


def test_absl_flags_on_a_fresh_flag_values():
    fv = flags.FlagValues()
    names = define_absl_flags(fv)
    assert names == list(FIELDS)
    fv(["launcher"])
    assert engine_args_from_absl(fv) == EngineArgs()
    for name, f in FIELDS.items():
        assert f.metadata["help"] in fv[name].help
        assert fv[name].default == f.default
        if f.metadata["choices"]:
            assert tuple(fv[name].parser.enum_values) == f.metadata["choices"]

    fv = flags.FlagValues()
    define_absl_flags(fv)
    argv = ["launcher"]
    for name, v in CHANGED.items():
        argv.append((f"--{name}" if v else f"--no{name}") if isinstance(v, bool) else f"--{name}={v}")
    fv(argv)
    assert engine_args_from_absl(fv) == EngineArgs(**CHANGED)
    assert engine_args_from_absl(fv, max_num_seqs=3).max_num_seqs == 3


def test_absl_rejects_bad_values():
    for bad in (["launcher", "--scheduler_policy=fifo"], ["launcher", "--max_num_seqs=0"],
                ["launcher", "--block_size=x"]):
        fv = flags.FlagValues()
        define_absl_flags(fv)
        with pytest.raises(flags.Error):
            fv(bad)


@pytest.mark.parametrize("field,value", [
    ("dtype", "float64"), ("scheduler_policy", "fifo"), ("max_num_seqs", 0), ("block_size", 2.5),
    ("kv_cache_memory_gb", 0.0), ("async_scheduling", 1), ("model", None), ("max_waiting_prompt_tokens", 0),
])
def test_engine_args_validates_each_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**{field: value})


def test_engine_args_is_importable_from_engine():
    from jaxinfer.engine import EngineArgs as FromEngine

    assert FromEngine is EngineArgs
