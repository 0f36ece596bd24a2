"""The executable cache (jaxinfer/executable_cache.py): a restart loads the warm-up's executables instead of
compiling them, computes exactly what a cold start computes, misses on any change of what an executable depends
on, and falls back to compiling when a file is corrupt or truncated."""
from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import LLM, SamplingParams, sampler
from jaxinfer.batch import SeqChunk
from jaxinfer.config import ModelConfig
from jaxinfer.executable_cache import ExecutableCache
from jaxinfer.loaders.common import random_params
from jaxinfer.model_runner import ModelRunner

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)
GREEDY, RANDOM = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
PARAMS = random_params(TINY, jnp.float32)


def _runner(cache_dir, config=TINY, params=PARAMS, dtype=jnp.float32, num_blocks=8) -> ModelRunner:
    return ModelRunner(config, params, num_blocks=num_blocks, block_size=4, max_num_seqs=2,
                       max_num_batched_tokens=4, max_model_len=16, kv_dtype=jnp.float32, attention_backend="xla",
                       matmul_backend="xla", dtype=dtype, executable_cache_dir=str(cache_dir))


def _sources(runner) -> dict[str, str]:
    return {r.name: r.source for r in runner.warmup_records}


def _step(runner) -> tuple:
    """One prefill step of two sequences, one greedy and one seeded random row: (token ids, logprobs)."""
    chunks = [SeqChunk([3, 9], 0, [0]), SeqChunk([5], 0, [1])]
    rows = [sampler.RowInfo(params=p, seed=11, step=0, prompt_token_ids=c.token_ids, output_token_ids=[])
            for p, c in zip((GREEDY, SamplingParams(temperature=1.0, seed=3)), chunks)]
    out, _ = runner.execute(chunks, rows)
    return out.token_ids.tolist(), np.asarray(out.logprob)


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    """A cache directory a first (cold) runner filled; the cold runner's step output for comparison."""
    path = tmp_path_factory.mktemp("executables")
    cold = _runner(path)
    cold.warmup([GREEDY, RANDOM])
    assert set(_sources(cold).values()) == {"compiled"}
    return path, _step(cold), set(_sources(cold))


def test_a_restart_loads_every_executable_and_computes_the_same(warm_dir):
    path, (cold_tokens, cold_logprobs), names = warm_dir
    warm = _runner(path)
    compiled = warm.num_compiled()
    warm.warmup([GREEDY, RANDOM])
    assert _sources(warm) == dict.fromkeys(names, "loaded")
    tokens, logprobs = _step(warm)
    assert tokens == cold_tokens
    np.testing.assert_array_equal(logprobs, cold_logprobs)
    assert warm.num_compiled() == compiled + len(names)  # the warm-up's executables, nothing compiled on demand
    _step(warm)
    assert warm.num_compiled() == compiled + len(names)


@pytest.mark.parametrize("change", ["model", "activation_dtype", "weight_dtype", "kv_pool_shape", "jax_version",
                                    "xla_flags"])
def test_a_changed_key_misses(warm_dir, monkeypatch, change):
    path, _, _ = warm_dir
    kwargs = {}
    if change == "model":
        kwargs["config"] = ModelConfig(**{**TINY.__dict__, "rms_norm_eps": TINY.rms_norm_eps * 10})
    elif change == "activation_dtype":
        kwargs["dtype"] = jnp.bfloat16
    elif change == "weight_dtype":
        kwargs["params"] = random_params(TINY, jnp.bfloat16)
    elif change == "kv_pool_shape":
        kwargs["num_blocks"] = 12
    elif change == "jax_version":
        monkeypatch.setattr(jax, "__version__", "0.0.0-other")
    else:
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    runner = _runner(path, **kwargs)
    runner.warmup([GREEDY], token_counts=[1])
    sources = _sources(runner)
    # Every forward depends on all of these; the sampler does not see the weights or the KV pool.
    assert {s for n, s in sources.items() if n.startswith("forward/")} == {"compiled"}
    if change not in ("weight_dtype", "kv_pool_shape"):
        assert set(sources.values()) == {"compiled"}


def test_a_new_sampling_variant_compiles_only_its_sampler(warm_dir):
    path, _, _ = warm_dir
    runner = _runner(path)
    runner.warmup([GREEDY, SamplingParams(temperature=1.0, top_k=5)])
    compiled = {n for n, s in _sources(runner).items() if s == "compiled"}
    assert compiled and all(n.startswith("sample/") and "num_candidates=0" not in n for n in compiled)


def test_damaged_files_fall_back_to_compiling(warm_dir, tmp_path):
    """Truncated, bit-flipped and foreign files (a copy of the cache, each file damaged one way) are compiled
    again, compute what the cold runner did, and are rewritten so the next start loads them."""
    path, (cold_tokens, cold_logprobs), names = warm_dir
    copy = tmp_path / "cache"
    damages = [lambda b: b[:len(b) // 2], lambda b: b[:-100] + bytes([b[-100] ^ 0xFF]) + b[-99:],
               lambda b: b"not an executable", lambda b: b""]
    for i, src in enumerate(sorted(glob.glob(os.path.join(path, "**", "*.jexe"), recursive=True))):
        dst = copy / os.path.relpath(src, path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(damages[i % len(damages)](open(src, "rb").read()))
    runner = _runner(copy)
    runner.warmup([GREEDY, RANDOM])
    assert _sources(runner) == dict.fromkeys(names, "compiled")
    tokens, logprobs = _step(runner)
    assert tokens == cold_tokens
    np.testing.assert_array_equal(logprobs, cold_logprobs)
    again = _runner(copy)
    again.warmup([GREEDY, RANDOM])
    assert set(_sources(again).values()) == {"loaded"}


def test_store_is_atomic_and_a_file_for_another_key_is_refused(tmp_path):
    double = jax.jit(lambda x: 2 * x)
    cache = ExecutableCache(str(tmp_path), {"what": "test"})
    args = (jax.ShapeDtypeStruct((3,), jnp.float32),)
    compiled, record = cache.get("double", double, args)
    assert record.source == "compiled"
    files = glob.glob(os.path.join(str(tmp_path), "**", "*"), recursive=True)
    assert [os.path.basename(f) for f in files if os.path.isfile(f)] == [f"{cache.key('double', args, {})}.jexe"]
    loaded, record = cache.get("double", double, args)
    assert record.source == "loaded"
    np.testing.assert_array_equal(loaded(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # A valid file renamed to another key's name is not used for that key.
    other = (jax.ShapeDtypeStruct((4,), jnp.float32),)
    os.replace(cache.path(cache.key("double", args, {})), cache.path(cache.key("double", other, {})))
    assert cache.load(cache.key("double", other, {})) is None
    assert ExecutableCache(None, {}).get("double", double, args)[1].source == "compiled"  # no directory: no cache


def test_warm_engine_gives_the_cold_engines_tokens_and_background_warmup_serves(tiny_dir, tmp_path):
    """The whole engine: a cold start fills the cache, a restart loads everything and samples the same tokens
    (greedy and seeded random); a background warm-up serves before all buckets are ready, compiles nothing
    on demand, and ends with every bucket loaded."""
    engine = dict(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64, num_kv_blocks=16, verbose=False,
                  compilation_cache_dir=str(tmp_path), executable_cache=True)
    prompts = [[5, 6, 7], list(range(10, 22)), [42] * 5]  # the 12-token prompt runs in chunks
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    results = []
    for _ in range(2):
        llm = LLM(tiny_dir, **engine)
        llm.warmup()
        results.append(([o.token_ids for o in llm.generate(prompts, params)], llm.engine.stats.snapshot().startup))
    (cold_tokens, cold), (warm_tokens, warm) = results
    assert cold.num_executables_compiled > 0 and cold.num_executables_loaded == 0
    assert warm.num_executables_loaded == cold.num_executables_compiled and warm.num_executables_compiled == 0
    assert warm.trace_s == 0 and warm.executable_load_s > 0 and warm.time_to_ready_s > warm.load_s > 0
    assert warm_tokens == cold_tokens

    llm = LLM(tiny_dir, background_warmup=True, **engine)
    llm.warmup()
    try:
        outs = llm.generate(prompts, params)
        assert [len(o.token_ids) for o in outs] == [6, 6, 6]
        assert llm.engine.stats.snapshot().num_compilations_after_warmup == 0
    finally:
        assert llm.engine.runner.wait_for_warmup(timeout=600)
    runner = llm.engine.runner
    assert runner.warm_buckets == runner.buckets and runner.num_warmup_pending == 0
    assert llm.engine.stats.snapshot().num_compilations_after_warmup == 0


_STAGE = r'''
import sys, jax, jax.numpy as jnp
from jaxinfer.executable_cache import ExecutableCache
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
def gather_shift(x, idx):  # a gather and an iota: fused kernels of their own on XLA:CPU
    return jnp.take(x * 2.0, idx, axis=0) + jnp.arange(idx.shape[0], dtype=x.dtype)[:, None]
x, idx = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8), jnp.arange(16) % 5
step = jax.jit(gather_shift)
if sys.argv[1] == "fill-xla-cache":
    step(x, idx).block_until_ready()
else:
    if sys.argv[1] == "store":
        step(x, idx).block_until_ready()  # read back from JAX's persistent cache, and held in memory
    cache = ExecutableCache(sys.argv[3], {})
    compiled, record = cache.get("gather_shift", step, (x, idx))
    print(record.source, float(compiled(x, idx).sum()), float(gather_shift(x, idx).sum()))
'''


def test_an_executable_stored_after_a_persistent_cache_hit_runs_in_a_new_process(tmp_path):
    """JAX's persistent cache hands back XLA:CPU executables that serialise without their kernels; the cache
    must store a complete one even when the same program was already read from that cache in this process.
    Three fresh processes: fill JAX's cache; hit it, then store ours; load ours and run it."""
    import subprocess
    import sys

    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    xla_dir, ours = str(tmp_path / "xla"), str(tmp_path / "executables")
    outputs = []
    for stage in ("fill-xla-cache", "store", "load"):
        proc = subprocess.run([sys.executable, str(script), stage, xla_dir, ours], capture_output=True, text=True,
                              timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__)))})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout.split())
    assert outputs[1][0] == "compiled" and outputs[2][0] == "loaded"
    assert outputs[2][1] == outputs[2][2] == outputs[1][2]
