"""Ragged paged attention: Pallas kernel (interpret mode on CPU) vs the pure-JAX reference, the reference vs
a dense numpy oracle over the unpaged sequences, and the decode case vs JAX's bundled GPU paged attention.

Tolerances: f32 1e-5 (abs and rel; interpret mode runs the same f32 math in a different order);
f16 / bf16 / int8 / fp8 KV 2e-2 (the kernel feeds softmax probabilities to the P@V dot in the
activation dtype, as flash attention does on tensor cores; the reference stays in f32).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.paged_attention import (quantize_kv, ragged_paged_attention, reference_paged_attention,
                                            write_kv_pages, write_kv_pages_quantized)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def make_batch(seed, specs, *, Hq, Hkv, D, bs, num_blocks, dtype=jnp.float32, extra_tokens=3, extra_seqs=2,
               max_blocks=None, share_prefix=False, garbage_tables=False):
  """specs: [(q_len, kv_len)]. Pages are handed out in a random order; with share_prefix, sequence 1 reuses
  sequence 0's first page (same prefix positions). Returns kernel args and the dense per-sequence contexts."""
  rng = np.random.default_rng(seed)
  S = len(specs) + extra_seqs
  MB = max_blocks or max(math.ceil(kv / bs) for _, kv in specs)
  pool = list(rng.permutation(num_blocks))
  tables = np.zeros((S, MB), np.int32)
  if garbage_tables:  # unused entries that would be out of bounds if ever read
    tables[:] = rng.choice([num_blocks + 7, -3, 10 ** 6], size=(S, MB))
  for s, (_, kv) in enumerate(specs):
    n = math.ceil(kv / bs)
    for j in range(n):
      tables[s, j] = tables[0, 0] if (share_prefix and s == 1 and j == 0) else pool.pop()
  T = sum(q for q, _ in specs) + extra_tokens
  qs = np.zeros(S + 1, np.int32)
  qs[1:len(specs) + 1] = np.cumsum([q for q, _ in specs])
  qs[len(specs) + 1:] = qs[len(specs)]
  kv_lens = np.zeros(S, np.int32)
  kv_lens[:len(specs)] = [kv for _, kv in specs]
  q = rng.standard_normal((T, Hq, D)).astype(np.float32)
  k_pages = rng.standard_normal((Hkv, num_blocks, bs, D)).astype(np.float32)
  v_pages = rng.standard_normal((Hkv, num_blocks, bs, D)).astype(np.float32)
  args = (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(kv_lens),
          jnp.asarray(tables), jnp.asarray(qs), jnp.asarray([len(specs)], jnp.int32))
  return args


def dense_oracle(args, *, sm_scale, sliding_window=None, soft_cap=None, k_scales=None, v_scales=None):
  """Independent numpy oracle: rebuild each sequence's contiguous K/V token by token, causal softmax."""
  q, kp, vp, kv_lens, tables, qs, ns = [np.asarray(a, np.float32) if i < 3 else np.asarray(a)
                                        for i, a in enumerate(args)]
  if k_scales is not None:
    kp = kp * np.asarray(k_scales, np.float32)[..., None]
    vp = vp * np.asarray(v_scales, np.float32)[..., None]
  T, Hq, D = q.shape
  Hkv, _, bs, _ = kp.shape
  out = np.zeros((T, Hq, D), np.float32)
  for s in range(int(ns[0])):
    L, q_len = kv_lens[s], qs[s + 1] - qs[s]
    k = np.stack([kp[:, tables[s, p // bs], p % bs] for p in range(L)], axis=1)  # [Hkv, L, D]
    v = np.stack([vp[:, tables[s, p // bs], p % bs] for p in range(L)], axis=1)
    for i in range(q_len):
      pos = L - q_len + i
      lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
      for h in range(Hq):
        kh = h // (Hq // Hkv)
        sc = k[kh, lo:pos + 1] @ q[qs[s] + i, h] * sm_scale
        if soft_cap is not None:
          sc = soft_cap * np.tanh(sc / soft_cap)
        p = np.exp(sc - sc.max())
        out[qs[s] + i, h] = (p / p.sum()) @ v[kh, lo:pos + 1]
  return out


MIXED = [(1, 37), (16, 16), (5, 40), (1, 16), (7, 7), (3, 33)]  # decodes, 0-prefix prefill, page crossings


@pytest.mark.parametrize("kw", [
    dict(),
    dict(sliding_window=10, soft_cap=5.0),
])
def test_reference_matches_dense_numpy(kw):
  args = make_batch(0, MIXED, Hq=6, Hkv=2, D=64, bs=8, num_blocks=40, share_prefix=True)
  ref = reference_paged_attention(*args, sm_scale=0.125, **kw)
  np.testing.assert_allclose(np.asarray(ref), dense_oracle(args, sm_scale=0.125, **kw), atol=1e-5, rtol=1e-5)


CASES = {
    # name: (specs, make_batch kwargs, kernel kwargs)
    "mixed_gqa_f32": (MIXED, dict(Hq=4, Hkv=2, D=64, bs=16, num_blocks=24), dict()),
    "odd_groups_small_tiles_splitk": (MIXED, dict(Hq=9, Hkv=3, D=64, bs=8, num_blocks=40),
                                      dict(block_q=2, num_splits=3)),
    "mqa_window_softcap_d128": ([(1, 70), (9, 40), (4, 4)], dict(Hq=8, Hkv=1, D=128, bs=32, num_blocks=8),
                                dict(sliding_window=12, soft_cap=20.0)),
    "mha_bf16_shared_pages": (MIXED, dict(Hq=2, Hkv=2, D=64, bs=64, num_blocks=8, dtype=jnp.bfloat16,
                                          share_prefix=True), dict()),
    "f16_bs32": ([(2, 64), (33, 40)], dict(Hq=4, Hkv=1, D=64, bs=32, num_blocks=8, dtype=jnp.float16), dict()),
    "long_decode_splitk_garbage_tables": ([(1, 200), (1, 3), (1, 129)],
                                          dict(Hq=4, Hkv=2, D=64, bs=16, num_blocks=40, max_blocks=16,
                                               garbage_tables=True, extra_tokens=0), dict(num_splits=4)),
    "no_sequences": ([], dict(Hq=4, Hkv=2, D=64, bs=16, num_blocks=4, max_blocks=2, extra_seqs=3), dict()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
  specs, batch_kw, kernel_kw = CASES[name]
  args = make_batch(1, specs, **batch_kw)
  out = ragged_paged_attention(*args, sm_scale=0.1, interpret=True, **kernel_kw)
  kernel_kw = {k: v for k, v in kernel_kw.items() if k in ("sliding_window", "soft_cap")}
  ref = reference_paged_attention(*args, sm_scale=0.1, **kernel_kw)
  tol = TOL[batch_kw.get("dtype", jnp.float32)]
  assert out.shape == ref.shape and out.dtype == args[0].dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  real = int(args[5][int(args[6][0])])
  assert not np.any(np.asarray(out[real:], np.float32)), "padding tokens must be zero"


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_kernel_quantized_kv(kv_dtype):
  args = make_batch(2, MIXED, Hq=4, Hkv=2, D=64, bs=16, num_blocks=24, dtype=jnp.bfloat16)
  q, kp, vp, *rest = args
  kq, ks = quantize_kv(kp, kv_dtype)
  vq, vs = quantize_kv(vp, kv_dtype)
  assert kq.dtype == kv_dtype and ks.shape == kp.shape[:-1]
  out = ragged_paged_attention(q, kq, vq, *rest, sm_scale=0.1, k_scales=ks, v_scales=vs, interpret=True)
  ref = reference_paged_attention(q, kq, vq, *rest, sm_scale=0.1, k_scales=ks, v_scales=vs)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
  # and the quantized cache still approximates the full-precision one
  full = reference_paged_attention(*args, sm_scale=0.1)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(full, np.float32), atol=0.1)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 30)), min_size=1, max_size=4), st.integers(0, 9))
def test_kernel_random_ragged_batches(chunks, seed):
  """Fixed shapes (so one compilation), random ragged contents: specs are (q_len, cached prefix)."""
  specs = [(q, q + c) for q, c in chunks]
  extra = 48 - sum(q for q, _ in specs)
  args = make_batch(seed, specs, Hq=4, Hkv=2, D=64, bs=8, num_blocks=32, max_blocks=6, extra_tokens=extra,
                    extra_seqs=4 - len(specs))
  out = ragged_paged_attention(*args, sm_scale=0.2, interpret=True, block_q=4)
  ref = reference_paged_attention(*args, sm_scale=0.2)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_decode_matches_jax_bundled_paged_attention():
  from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
  B, Hq, Hkv, D, bs, MB = 3, 8, 2, 64, 16, 8
  args = make_batch(3, [(1, 5), (1, 70), (1, 128)], Hq=Hq, Hkv=Hkv, D=D, bs=bs, num_blocks=32, max_blocks=MB,
                    extra_tokens=0, extra_seqs=0)
  q, kp, vp, kv_lens, tables, qs, ns = args
  sm_scale = D ** -0.5
  # The bundled kernel has no sm_scale argument: pre-scale q (exact for a power-of-two scale).
  theirs = jax_pa.paged_attention(q * sm_scale, kp, vp, tables, kv_lens, k_splits=2, pages_per_compute_block=2,
                                  interpret=True)
  ours = ragged_paged_attention(*args, sm_scale=sm_scale, interpret=True)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5, rtol=1e-5)


def test_write_kv_pages_drops_padding():
  Hkv, NB, bs, D = 2, 3, 4, 8
  kp = jnp.zeros((Hkv, NB, bs, D))
  k = jnp.arange(4 * Hkv * D, dtype=jnp.float32).reshape(4, Hkv, D) + 1
  slots = jnp.asarray([5, 0, NB * bs, -1], jnp.int32)  # two real slots, two padding slots
  kp2, vp2 = write_kv_pages(kp, kp, k, -k, slots)
  expect = np.zeros((Hkv, NB, bs, D), np.float32)
  expect[:, 1, 1] = k[0]
  expect[:, 0, 0] = k[1]
  np.testing.assert_array_equal(np.asarray(kp2), expect)
  np.testing.assert_array_equal(np.asarray(vp2), -expect)

  ks = jnp.ones((Hkv, NB, bs))
  kq, vq, ks2, vs2 = write_kv_pages_quantized(kp.astype(jnp.int8), kp.astype(jnp.int8), ks, ks, k, k, slots)
  deq = np.asarray(kq, np.float32) * np.asarray(ks2)[..., None]
  np.testing.assert_allclose(deq[:, 1, 1], np.asarray(k[0]), rtol=1e-2)
  assert float(ks2[0, 2, 3]) == 1.0  # untouched slot keeps its scale


def test_lowers_to_triton_for_cuda():
  """Cross-lowering for CUDA on a CPU host: checks the kernel is expressible in the Pallas Triton lowering
  (power-of-two tensors, supported primitives). Compiling the Triton IR to PTX needs a GPU."""
  sd = jax.ShapeDtypeStruct
  T, S, Hq, Hkv, D, bs, NB, MB = 64, 8, 12, 4, 128, 16, 64, 16
  shapes = [sd((T, Hq, D), jnp.bfloat16), sd((Hkv, NB, bs, D), jnp.int8), sd((Hkv, NB, bs, D), jnp.int8),
            sd((S,), jnp.int32), sd((S, MB), jnp.int32), sd((S + 1,), jnp.int32), sd((1,), jnp.int32),
            sd((Hkv, NB, bs), jnp.float32), sd((Hkv, NB, bs), jnp.float32)]
  f = lambda *a: ragged_paged_attention(*a[:7], sm_scale=0.1, sliding_window=32, soft_cap=30.0, k_scales=a[7],
                                        v_scales=a[8], num_splits=2)
  try:
    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  except (ImportError, ModuleNotFoundError) as e:  # jaxlib built without the Triton bindings
    pytest.skip(f"no Triton lowering in this jaxlib: {e}")
  assert "xla.gpu.triton" in text
