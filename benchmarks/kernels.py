"""Kernel benchmarks: decode paged attention (achieved HBM GB/s, % of peak) and weight-only quantized matmul.

    python benchmarks/kernels.py            # on a CUDA GPU
    python benchmarks/kernels.py --smoke    # tiny shapes in Pallas interpret mode (checks the script on CPU)

Numbers are medians over --runs timed calls after a warm-up (compilation excluded).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxinfer.quantization import quantize  # noqa: E402
from pallas_kernels.paged_attention import ragged_paged_attention, reference_paged_attention  # noqa: E402
from pallas_kernels.quant_matmul import quant_matmul  # noqa: E402

# Peak HBM bandwidth, TB/s, matched against jax's device_kind (most specific first).
PEAK_TBPS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0)]


def peak_tbps(device):
  kind = device.device_kind
  return next((bw for name, bw in PEAK_TBPS if name in kind), None)


def median_time(fn, *args, runs):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def table(title, header, rows):
  print(f"\n{title}")
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for r in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def fmt_us(t):
  return "-" if t is None else f"{t * 1e6:.1f}"


def try_time(fn, *args, runs):
  try:
    return median_time(fn, *args, runs=runs), ""
  except Exception as e:  # a config the other implementation cannot run: report, keep going
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


# ----------------------------------------------------------------------------------------------------------


def decode_case(B, ctx, *, Hq, Hkv, D, bs, dtype, seed=0):
  """A decode step: B sequences of ctx tokens each, one query token each, pages scattered at random."""
  rng = np.random.default_rng(seed)
  mb = ctx // bs
  num_blocks = B * mb
  tables = rng.permutation(num_blocks).reshape(B, mb).astype(np.int32)
  key = jax.random.PRNGKey(seed)
  kk, kv, kq = jax.random.split(key, 3)
  k_pages = jax.random.normal(kk, (Hkv, num_blocks, bs, D), dtype)
  v_pages = jax.random.normal(kv, (Hkv, num_blocks, bs, D), dtype)
  q = jax.random.normal(kq, (B, Hq, D), dtype)
  return (q, k_pages, v_pages, jnp.full((B,), ctx, jnp.int32), jnp.asarray(tables),
          jnp.arange(B + 1, dtype=jnp.int32), jnp.asarray([B], jnp.int32))


def bench_paged_attention(args, device):
  interpret = args.smoke
  Hq, Hkv, D, bs, dtype = (32, 8, 128, 16, jnp.bfloat16) if not args.smoke else (4, 2, 64, 16, jnp.float32)
  batches = [1, 8, 32, 128, 256] if not args.smoke else [1, 4]
  contexts = [512, 2048, 8192, 32768] if not args.smoke else [32, 64]
  peak = peak_tbps(device)
  sm_scale = D ** -0.5
  ours = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=sm_scale, interpret=interpret))
  ref = jax.jit(lambda *a: reference_paged_attention(*a, sm_scale=sm_scale))
  try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
  except ImportError:
    jax_pa = None

  def bundled(q, kp, vp, lens, tables, *_):
    mb = tables.shape[1]
    splits = 16 if mb % 16 == 0 else 1
    return jax_pa.paged_attention(q * sm_scale, kp, vp, tables, lens, k_splits=splits,
                                  pages_per_compute_block=min(8, mb // splits), interpret=interpret)

  rows, notes = [], set()
  for B in batches:
    for ctx in contexts:
      if B * ctx > args.max_tokens:
        continue
      case = decode_case(B, ctx, Hq=Hq, Hkv=Hkv, D=D, bs=bs, dtype=dtype)
      kv_bytes = 2 * B * ctx * Hkv * D * jnp.dtype(dtype).itemsize  # K and V of every context, read once
      t_ours = median_time(ours, *case, runs=args.runs)
      # The dense reference materialises [B, Hkv, ctx, D] f32 copies: only time it where that fits.
      t_ref, err = (try_time(ref, *case, runs=args.runs) if B * ctx <= args.max_ref_tokens else (None, ""))
      t_jax, err2 = (try_time(jax.jit(bundled), *case, runs=args.runs) if jax_pa else (None, "not bundled"))
      notes.update(n for n in (err, err2) if n)
      gbps = kv_bytes / t_ours / 1e9
      rows.append([B, ctx, fmt_us(t_ours), f"{gbps:.0f}", "-" if peak is None else f"{100 * gbps / (peak * 1e3):.0f}%",
                   fmt_us(t_ref), fmt_us(t_jax),
                   "-" if t_jax is None else f"{kv_bytes / t_jax / 1e9:.0f}"])
      del case
  table(f"Decode paged attention on {device.device_kind}: Hq={Hq} Hkv={Hkv} D={D} block={bs} "
        f"{jnp.dtype(dtype).name} (peak {peak or 'unknown'} TB/s)",
        ["batch", "ctx", "ours us", "ours GB/s", "% peak", "xla ref us", "jax bundled us", "bundled GB/s"], rows)
  for n in sorted(notes):
    print(f"  note: {n}")


def bench_quant_matmul(args, device):
  interpret = args.smoke
  shapes = [(4096, 4096), (4096, 14336), (14336, 4096)] if not args.smoke else [(256, 128)]
  ms = [1, 4, 16, 64, 256] if not args.smoke else [1, 16]
  formats = [(4, 128, False), (8, None, True)]  # int4 g128 asymmetric (GPTQ/AWQ-like), int8 per-channel
  dtype = jnp.bfloat16
  dense_dot = jax.jit(jnp.dot)
  rows = []
  for K, N in shapes:
    w_float = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) * 0.02
    w_bf16 = jnp.asarray(w_float, dtype)
    weights = {f"int{b}{'' if g is None else f'-g{g}'}": quantize(w_float, b, g, s, scale_dtype=jnp.float16)
               for b, g, s in formats}
    for M in ms:
      x = jnp.asarray(np.random.default_rng(M).standard_normal((M, K)), dtype)
      t_dense = median_time(dense_dot, x, w_bf16, runs=args.runs)
      row = [f"{K}x{N}", M, fmt_us(t_dense)]
      for name, w in weights.items():
        fn = jax.jit(lambda x, w: quant_matmul(x, w, interpret=interpret))
        t = median_time(fn, x, w, runs=args.runs)
        wbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))
        row += [fmt_us(t), f"{t_dense / t:.2f}x", f"{wbytes / t / 1e9:.0f}"]
      rows.append(row)
  header = ["K x N", "M", "bf16 dot us"]
  for name in weights:
    header += [f"{name} us", f"{name} speedup", f"{name} GB/s"]
  table(f"Weight-only quantized matmul on {device.device_kind} (bf16 activations; speedup vs bf16 jnp.dot)",
        header, rows)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpret mode (runs on CPU)")
  p.add_argument("--runs", type=int, default=None, help="timed runs per config (default 20, smoke 2)")
  p.add_argument("--max-tokens", type=int, default=1 << 21, help="skip decode configs with batch*ctx above this")
  p.add_argument("--max-ref-tokens", type=int, default=1 << 18, help="time the XLA reference up to batch*ctx")
  p.add_argument("--only", choices=["attention", "quant"], default=None)
  args = p.parse_args()
  args.runs = args.runs or (2 if args.smoke else 20)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}"
        + (" [smoke: interpret mode, timings meaningless]" if args.smoke else ""))
  if device.platform != "gpu" and not args.smoke:
    sys.exit("no GPU found: pass --smoke to check the script in interpret mode")
  if args.only in (None, "attention"):
    bench_paged_attention(args, device)
  if args.only in (None, "quant"):
    bench_quant_matmul(args, device)


if __name__ == "__main__":
  main()
