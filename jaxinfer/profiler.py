"""Memory profiler (`jaxinfer profile`): device memory and KV use of an engine over a workload.

Sources, and what each can see:
- GPU/TPU: `device.memory_stats()`: `bytes_in_use` (everything the allocator holds between steps) and
  `peak_bytes_in_use` (the allocator's high-water mark, including XLA's temporaries inside a step; since process
  start, as JAX cannot reset it, so a loading transient can show in it).
- CPU: no allocator statistics. `jax.live_arrays()` sums the arrays alive between steps; it cannot see XLA's
  temporaries inside a step, nor arrays of other engines in the same process apart from this one's (they count
  as "other").
- Both: the step's workspace from XLA's buffer assignment of the largest compiled step (`memory_analysis()`
  of the forward and the sampler at the largest token bucket: `temp_size_in_bytes`), exact for what XLA
  allocates inside a step. Weights and KV pages are the engine's own arrays, summed on the device.
KV utilisation and fragmentation come from the block pool after every step (`engine.metrics()`): used blocks
(referenced by live sequences), cached (evictable prefix blocks) and fragmentation (allocated slots not yet
written in sequences' last blocks, over all allocated slots).
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import jax
import numpy as np

GiB = 2**30


def device_bytes(tree, device) -> int:
    """Bytes of a pytree's arrays that live on `device` (from the sharding's shard shape: reading
    `addressable_shards[i].data` would make new array objects over the same buffers, which live_arrays() then
    counts twice)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if device in leaf.sharding.device_set:
            total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemorySample:
    step: int
    in_use_bytes: int         # GPU: allocator bytes_in_use; CPU: live arrays on the device
    peak_bytes: int | None    # GPU: allocator peak so far; CPU: None
    used_blocks: int
    cached_blocks: int
    kv_usage: float           # used / total blocks
    fragmentation: float
    num_running: int
    num_waiting: int


@dataclasses.dataclass
class MemoryProfile:
    source: str               # "memory_stats" or "live_arrays"
    device: str
    weights_bytes: int
    kv_bytes: int
    total_blocks: int
    workspace_bytes: int | None  # XLA temporaries of the largest step (forward + sampler)
    samples: list[MemorySample]

    @property
    def steady_bytes(self) -> int:
        """Median in-use bytes between steps while requests ran."""
        running = [s.in_use_bytes for s in self.samples if s.num_running] or [s.in_use_bytes for s in self.samples]
        return int(statistics.median(running))

    @property
    def peak_bytes(self) -> int:
        """GPU: the allocator's peak. CPU: the largest between-step total plus the step's workspace."""
        peaks = [s.peak_bytes for s in self.samples if s.peak_bytes is not None]
        if peaks:
            return max(peaks)
        return max(s.in_use_bytes for s in self.samples) + (self.workspace_bytes or 0)

    @property
    def other_steady_bytes(self) -> int:
        """In use between steps beyond weights and KV pages (step inputs/outputs, sampler state, ...)."""
        return self.steady_bytes - self.weights_bytes - self.kv_bytes

    @property
    def activation_peak_bytes(self) -> int:
        """What a step adds on top of the steady state at its peak."""
        return self.peak_bytes - self.steady_bytes

    def to_dict(self) -> dict:
        return {"source": self.source, "device": self.device, "weights_bytes": self.weights_bytes,
                "kv_bytes": self.kv_bytes, "total_blocks": self.total_blocks,
                "workspace_bytes": self.workspace_bytes, "steady_bytes": self.steady_bytes,
                "peak_bytes": self.peak_bytes, "other_steady_bytes": self.other_steady_bytes,
                "activation_peak_bytes": self.activation_peak_bytes,
                "max_kv_usage": max(s.kv_usage for s in self.samples),
                "samples": [dataclasses.asdict(s) for s in self.samples]}


def random_requests(vocab_size: int, num_requests: int, *, seed: int = 0, input_range=(16, 128),
                    output_range=(16, 128)):
    """Seeded random-token prompts and exact output lengths (ignore_eos), as `jaxinfer bench throughput`."""
    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_requests):
        prompt = rng.integers(100, vocab_size, int(rng.integers(input_range[0], input_range[1] + 1))).tolist()
        n = int(rng.integers(output_range[0], output_range[1] + 1))
        out.append((prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
    return out


def step_workspace_bytes(runner) -> int:
    """XLA's temporaries for the largest token bucket: forward and greedy sampler, as compiled (a persistent
    compilation cache hit when the engine has run that bucket before)."""
    from jaxinfer import sampler
    from jaxinfer.sampling_params import SamplingParams

    num_tokens = runner.buckets[-1]
    batch = runner.prepare([], min_tokens=num_tokens)
    # The runner's jitted functions (private, read-only use): lowering compiles without running or donating.
    forward = runner._forward.lower(runner.params, runner.kv_cache, batch, None, runner._no_prev_tokens).compile()
    rows = [sampler.RowInfo(params=SamplingParams(temperature=0.0), seed=0, step=0, prompt_token_ids=[0],
                            output_token_ids=[])]
    tensors, flags = sampler.make_sampling_tensors(rows, runner.num_rows(num_tokens), runner.config.vocab_size)
    logits = jax.ShapeDtypeStruct((runner.num_rows(num_tokens), runner.config.vocab_size), np.float32)
    sample = runner._sample.lower(logits, tensors, runner._no_prev_tokens, flags=flags,
                                  eos_token_ids=runner.eos_token_ids).compile()
    return sum(int(c.memory_analysis().temp_size_in_bytes) for c in (forward, sample))


def _in_use(device) -> tuple[int, int | None, str]:
    stats = device.memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"]), int(stats.get("peak_bytes_in_use", 0)) or None, "memory_stats"
    live = sum(device_bytes([a], device) for a in jax.live_arrays() if not a.is_deleted())
    return live, None, "live_arrays"


def profile_engine(engine, requests, *, workspace: bool = True) -> MemoryProfile:
    """Run `requests` ((prompt ids, SamplingParams) pairs) to completion, sampling memory and the block pool
    before the first step and after every step. A sharded engine is profiled on the device of its mesh that
    holds the most weights and KV pages (all its figures are that device's)."""
    runner = engine.runner
    devices = [d for d in runner.plan.mesh.devices.flat if d.process_index == jax.process_index()] \
        if runner.plan is not None else jax.devices()[:1]
    device = max(devices, key=lambda d: device_bytes((runner.params, runner.kv_cache), d))
    weights = device_bytes(runner.params, device)
    samples: list[MemorySample] = []

    def sample(step: int):
        jax.block_until_ready(runner.kv_cache)
        in_use, peak, source = _in_use(device)
        m = engine.metrics()
        samples.append(MemorySample(step, in_use, peak, int(m["used_blocks"]), int(m["cached_blocks"]),
                                    float(m["usage"]), float(m["fragmentation"]), int(m["num_running"]),
                                    int(m["num_waiting"])))
        return source

    for prompt, params in requests:
        engine.add_request(None, params, prompt_token_ids=prompt)
    source = sample(0)
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        sample(step)
    kv = device_bytes(runner.kv_cache, device)
    ws = step_workspace_bytes(runner) if workspace else None
    return MemoryProfile(source, str(device), weights, kv, runner.num_blocks, ws, samples)


def format_profile(p: MemoryProfile) -> str:
    g = lambda n: f"{n / GiB:9.4f} GiB"  # noqa: E731
    frag = [s.fragmentation for s in p.samples if s.used_blocks]
    lines = [
        f"jaxinfer profile on {p.device} (source: {p.source}; {len(p.samples) - 1} steps)",
        f"  weights                       {g(p.weights_bytes)}",
        f"  KV pages ({p.total_blocks} blocks)          {g(p.kv_bytes)}",
        f"  other between steps           {g(p.other_steady_bytes)}",
        f"  steady (median between steps) {g(p.steady_bytes)}",
        f"  step workspace (XLA temps)    " + (g(p.workspace_bytes) if p.workspace_bytes is not None else "not measured"),
        f"  peak                          {g(p.peak_bytes)}",
        f"KV blocks: peak {max(s.used_blocks for s in p.samples)} / {p.total_blocks} used "
        f"({max(s.kv_usage for s in p.samples):.1%}), {p.samples[-1].used_blocks} used after the workload, "
        f"{p.samples[-1].cached_blocks} cached for prefix reuse",
        f"fragmentation (unwritten slots in allocated blocks): mean {np.mean(frag) if frag else 0:.1%}, "
        f"max {max(frag) if frag else 0:.1%}",
    ]
    return "\n".join(lines)


def save_profile_plot(p: MemoryProfile, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'jaxinfer[plot]'") from None
    steps = [s.step for s in p.samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(steps, [s.kv_usage for s in p.samples], label="KV blocks used")
    top.plot(steps, [s.fragmentation for s in p.samples], label="fragmentation")
    top.plot(steps, [s.cached_blocks / p.total_blocks for s in p.samples], label="cached (prefix)")
    top.set_ylabel("fraction")
    top.legend(fontsize=8)
    other = [max(s.in_use_bytes - p.weights_bytes - p.kv_bytes, 0) / GiB for s in p.samples]
    bottom.stackplot(steps, [p.weights_bytes / GiB] * len(steps), [p.kv_bytes / GiB] * len(steps), other,
                     labels=["weights", "KV pages", f"other in use ({p.source})"])
    peaks = [s.peak_bytes / GiB for s in p.samples if s.peak_bytes is not None]
    if peaks:
        bottom.plot(steps, peaks, "k--", label="allocator peak")
    elif p.workspace_bytes is not None:
        bottom.axhline(p.peak_bytes / GiB, color="k", linestyle="--", label="peak: steady + step workspace")
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("GiB")
    bottom.set_xlabel("engine step")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
