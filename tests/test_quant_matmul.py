"""Weight-only quantized matmul: Pallas kernel (interpret mode on CPU) vs reference, and the GPTQ / AWQ / GGUF
repackers vs independent hand dequantization of each source format (and `gguf.quants.dequantize`).

Tolerances, as max|y - ref| / max|ref|: f32 activations 1e-5 (same math, different summation order);
bf16 / f16 activations 1e-2 (both sides see the same rounded x; the output is rounded to x's dtype).
Repacked weights must dequantize to the source format's values within f32 rounding (rtol 1e-6).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quantization import QuantizedWeight, dequantize, from_awq, from_gguf, from_gptq, quantize
from pallas_kernels.quant_matmul import quant_matmul, reference_quant_matmul

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
K, N = 256, 64


def rel_err(y, ref):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  return np.abs(y - ref).max() / np.abs(ref).max()


# (bits, group_size, symmetric, activation dtype, M); group_size None = per output channel
KERNEL_CASES = [
    (4, 32, True, jnp.float32, 1),
    (4, 64, False, jnp.bfloat16, 4),
    (4, 128, True, jnp.bfloat16, 16),
    (4, None, False, jnp.float32, 64),
    (4, 128, False, jnp.float16, 1),
    (8, None, True, jnp.bfloat16, 1),
    (8, 32, False, jnp.float32, 4),
    (8, 64, True, jnp.float32, 16),
    (8, 128, False, jnp.bfloat16, 64),
]


@pytest.mark.parametrize("bits,group_size,symmetric,dtype,M", KERNEL_CASES)
def test_kernel_matches_reference(bits, group_size, symmetric, dtype, M):
  rng = np.random.default_rng(bits * 1000 + M)
  w = quantize(rng.standard_normal((K, N)), bits, group_size, symmetric)
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  y = quant_matmul(x, w, interpret=True)
  assert y.shape == (M, N) and y.dtype == dtype
  assert rel_err(y, reference_quant_matmul(x, w)) < TOL[dtype]


def test_kernel_tuning_and_batch_dims():
  rng = np.random.default_rng(0)
  w = quantize(rng.standard_normal((K, N)), 4, 64, False)
  x = jnp.asarray(rng.standard_normal((2, 3, K)), jnp.float32)  # leading dims flatten to M = 6
  ref = reference_quant_matmul(x, w)
  for tuning in (dict(num_splits=1, block_k=32), dict(num_splits=4, block_n=32, block_k=64)):
    y = quant_matmul(x, w, interpret=True, **tuning)
    assert y.shape == (2, 3, N) and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (4, None, False), (8, 64, True)])
def test_quantize_round_to_nearest(bits, group_size, symmetric):
  w_float = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
  w = quantize(w_float, bits, group_size, symmetric)
  gs = group_size or K
  err = np.abs(np.asarray(dequantize(w)) - w_float).reshape(K // gs, gs, N).max(axis=1)
  assert np.all(err <= np.asarray(w.scales) * 0.5 + 1e-6)  # within half a step everywhere
  assert len(jax.tree_util.tree_leaves(w)) == (2 if symmetric else 3)  # metadata is static, not a leaf


# ---------------------------------------------------------------------------------------------- GPTQ / AWQ


def hand_pack(values, bits, axis, order=None):
  """Pack unsigned fields into int32 words along `axis`, field j of each word from position order[j]."""
  pf = 32 // bits
  order = order or list(range(pf))
  v = np.moveaxis(np.asarray(values, np.int64) & (2 ** bits - 1), axis, 0)
  words = np.zeros((v.shape[0] // pf,) + v.shape[1:], np.int64)
  for i in range(words.shape[0]):
    for j in range(pf):
      words[i] |= v[pf * i + order[j]] << (bits * j)
  return np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis)


def gptq_hand_dequant(qweight, qzeros, scales, g_idx, bits):
  pf = 32 // bits
  k = np.arange(qweight.shape[0] * pf)[:, None]
  n = np.arange(qweight.shape[1])[None, :]
  q = (qweight.view(np.uint32)[k // pf, n] >> (bits * (k % pf)).astype(np.uint32)) & (2 ** bits - 1)
  g = g_idx[k]
  z = ((qzeros.view(np.uint32)[g, n // pf] >> (bits * (n % pf)).astype(np.uint32)) & (2 ** bits - 1)) + 1
  return (q.astype(np.float32) - z) * scales[g, n].astype(np.float32)


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", [
    (4, 32, False, False), (4, 64, True, False), (4, 128, False, True), (8, 32, True, False)])
def test_gptq_repack(bits, group_size, act_order, symmetric):
  rng = np.random.default_rng(bits + group_size)
  G = K // group_size
  codes = rng.integers(0, 2 ** bits, (K, N))
  zeros = np.full((G, N), 2 ** (bits - 1)) if symmetric else rng.integers(0, 2 ** bits, (G, N))
  scales = (rng.random((G, N)) * 0.02 + 0.001).astype(np.float16)
  g_idx = np.arange(K) // group_size
  if act_order:  # groups formed in a random (Hessian) order, as GPTQ desc_act produces
    g_idx = g_idx[np.argsort(rng.permutation(K))]
  qweight = hand_pack(codes, bits, axis=0)
  qzeros = hand_pack(zeros - 1, bits, axis=1)  # v1 stores zero - 1 (zero 0 wraps to 2**bits, as in GPTQ)
  expect = gptq_hand_dequant(qweight, qzeros, scales, g_idx, bits)

  w = from_gptq(qweight, qzeros, scales, g_idx if act_order else None, bits=bits, group_size=group_size)
  assert w.shape == (K, N) and (w.perm is not None) == act_order and (w.offsets is None) == symmetric
  np.testing.assert_allclose(np.asarray(dequantize(w)), expect, rtol=1e-6, atol=1e-7)
  x = jnp.asarray(rng.standard_normal((4, K)), jnp.float32)
  assert rel_err(quant_matmul(x, w, interpret=True), np.asarray(x) @ expect) < 1e-5


AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # column 8c + j lives in nibble AWQ_REVERSE[j] of word c


def awq_hand_dequant(qweight, qzeros, scales, group_size):
  k = np.arange(qweight.shape[0])[:, None]
  n = np.arange(qweight.shape[1] * 8)[None, :]
  shift = (4 * np.asarray(AWQ_REVERSE)[n % 8]).astype(np.uint32)
  q = (qweight.view(np.uint32)[k, n // 8] >> shift) & 15
  z = (qzeros.view(np.uint32)[k // group_size, n // 8] >> shift) & 15
  return (q.astype(np.float32) - z) * scales[k // group_size, n].astype(np.float32)


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_repack(group_size):
  rng = np.random.default_rng(group_size)
  G = K // group_size
  codes, zeros = rng.integers(0, 16, (K, N)), rng.integers(0, 16, (G, N))
  scales = (rng.random((G, N)) * 0.02 + 0.001).astype(np.float16)
  order = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ's packing order
  qweight, qzeros = hand_pack(codes, 4, axis=1, order=order), hand_pack(zeros, 4, axis=1, order=order)
  expect = awq_hand_dequant(qweight, qzeros, scales, group_size)
  # the hand dequant recovers the codes we packed (so it really is independent of the pack order)
  np.testing.assert_allclose(expect, (codes - np.repeat(zeros, group_size, 0)) *
                             np.repeat(scales, group_size, 0).astype(np.float32), rtol=1e-6)
  w = from_awq(qweight, qzeros, scales, group_size=group_size)
  np.testing.assert_allclose(np.asarray(dequantize(w)), expect, rtol=1e-6, atol=1e-7)
  x = jnp.asarray(rng.standard_normal((16, K)), jnp.bfloat16)
  y = quant_matmul(x, w, interpret=True)
  assert rel_err(y, np.asarray(x, np.float32) @ expect) < 1e-2


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_repack_vs_gguf_dequantize(qtype):
  gguf = pytest.importorskip("gguf")
  t = gguf.GGMLQuantizationType[qtype]
  rng = np.random.default_rng(7)
  hf = rng.standard_normal((N, K)).astype(np.float32)  # HF layout [out, in]
  hf[3, 32:64] = 0.75  # a constant block: Q4_1 stores d = 0 with a nonzero min
  data = gguf.quants.quantize(hf, t)  # uint8 [N, K / 32 * block_bytes], what GGUFReader's tensor.data holds
  expect = gguf.quants.dequantize(data, t).T  # ours is [in, out] = [K, N]
  w = from_gguf(data, t)
  assert w.shape == (K, N) and w.group_size == 32
  np.testing.assert_allclose(np.asarray(dequantize(w)), expect, rtol=1e-6, atol=1e-7)
  x = jnp.asarray(rng.standard_normal((4, K)), jnp.float32)
  assert rel_err(quant_matmul(x, w, interpret=True), np.asarray(x) @ expect) < 1e-5


def test_gguf_file_roundtrip(tmp_path):
  """The reader's tensor.data layout (rows = HF out rows, reversed ne) is what from_gguf expects."""
  gguf = pytest.importorskip("gguf")
  hf = np.random.default_rng(8).standard_normal((N, K)).astype(np.float32)
  t = gguf.GGMLQuantizationType.Q4_0
  writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
  writer.add_tensor("w", gguf.quants.quantize(hf, t), raw_dtype=t)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tensor = gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors[0]
  assert list(tensor.shape) == [K, N]  # ne[0] = inner dim
  w = from_gguf(tensor.data, tensor.tensor_type)
  np.testing.assert_allclose(np.asarray(dequantize(w)), gguf.quants.dequantize(tensor.data, t).T, rtol=1e-6)
  assert np.abs(np.asarray(dequantize(w)) - hf.T).max() < 0.5  # and it is still the weight


def test_lowers_to_triton_for_cuda():
  """Cross-lowering for CUDA on a CPU host (Triton IR is built; PTX compilation needs a GPU)."""
  sd = jax.ShapeDtypeStruct
  Kb, Nb = 4096, 1024
  w = QuantizedWeight(qweight=sd((Kb // 8, Nb), jnp.int32), scales=sd((Kb // 128, Nb), jnp.float16),
                      offsets=sd((Kb // 128, Nb), jnp.float32), perm=None, bits=4, group_size=128)
  try:
    text = jax.jit(quant_matmul).trace(sd((4, Kb), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
  except (ImportError, ModuleNotFoundError) as e:
    pytest.skip(f"no Triton lowering in this jaxlib: {e}")
  assert "xla.gpu.triton" in text
