"""Writing quantized models as HF-format checkpoints in the GPTQ and AWQ (GEMM) layouts, so that HF transformers,
AutoGPTQ / GPTQModel, AutoAWQ, vLLM and jaxinfer's own loaders can read them.

Each quantized linear `model.layers.{i}.{module}.weight` (HF's `[out, in]`; logical W `[K = in, N = out]`)
becomes, under the same prefix:

GPTQ (`quant_method: gptq`)
  qweight  int32 `[K * bits / 32, N]`  codes packed along K: input k in bits [bits*(k % p), +bits) of word k // p,
                                       p = 32 / bits (lowest bits first)
  qzeros   int32 `[G, N * bits / 32]`  zero points packed along N the same way; `checkpoint_format: gptq` stores
                                       zero - 1 (the v1 convention AutoGPTQ and exllama read), `gptq_v2` zero
  scales   float16 `[G, N]`
  g_idx    int32 `[K]`                  the group of each input (act-order: not monotonic)
AWQ GEMM (`quant_method: awq`, `version: gemm`, 4-bit)
  qweight  int32 `[K, N / 8]`           codes packed along N: word j of row k holds columns 8j + ORDER[i] in
                                       nibble i, ORDER = 0, 2, 4, 6, 1, 3, 5, 7 (AWQ's interleaving)
  qzeros   int32 `[G, N / 8]`           zero points packed the same way (as they are, no offset)
  scales   float16 `[G, N]`
Embeddings, norms, biases and the LM head are written as float tensors under their HF names, beside config.json
(the model config plus `quantization_config`) and the tokenizer files.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxinfer.params import model_specs
from jaxinfer.quantization.group_quant import IntWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SAFETENSORS_FILE = "model.safetensors"


def pack_rows(values, bits: int) -> np.ndarray:
    """uint `[R, C]` -> int32 `[R * bits / 32, C]`: row r into field r % p of word r // p (p = 32 / bits)."""
    v = np.asarray(values, np.uint32)
    p = 32 // bits
    v = v.reshape(v.shape[0] // p, p, v.shape[1])
    words = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(p):
        words |= v[:, j, :] << np.uint32(bits * j)
    return words.view(np.int32)


def pack_columns(values, bits: int) -> np.ndarray:
    """uint `[R, C]` -> int32 `[R, C * bits / 32]`: column c into field c % p of word c // p."""
    return np.ascontiguousarray(pack_rows(np.asarray(values).T, bits).T)


def pack_awq(values) -> np.ndarray:
    """uint `[R, C]` (values < 16) -> int32 `[R, C / 8]` in AWQ's order: nibble i of word j = column 8j + ORDER[i]."""
    v = np.asarray(values, np.uint32)
    v = v.reshape(v.shape[0], v.shape[1] // 8, 8)[:, :, list(AWQ_ORDER)]
    words = np.zeros(v.shape[:2], np.uint32)
    for i in range(8):
        words |= v[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def gptq_tensors(w: IntWeight, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    zeros = w.zeros - (1 if checkpoint_format == "gptq" else 0)
    if zeros.min() < 0:
        raise ValueError("a zero point of 0 cannot be stored in GPTQ's v1 format (it stores zero - 1); quantize "
                         "with min_zero=1 or write checkpoint_format='gptq_v2'")
    return {"qweight": pack_rows(w.codes, w.bits), "qzeros": pack_columns(zeros, w.bits),
            "scales": w.scales.astype(np.float16), "g_idx": w.g_idx.astype(np.int32)}


def awq_tensors(w: IntWeight) -> dict[str, np.ndarray]:
    if w.bits != 4 or not np.array_equal(w.g_idx, np.arange(w.shape[0]) // w.group_size):
        raise ValueError("the AWQ GEMM format holds 4-bit weights in consecutive groups only")
    return {"qweight": pack_awq(w.codes), "qzeros": pack_awq(w.zeros), "scales": w.scales.astype(np.float16)}


def checkpoint_tensors(model, float_dtype=np.float32) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint by HF name: packed linears and float tensors in HF layout."""
    qc = model.settings.quantization_config()
    tensors = {}
    for spec in model_specs(model.config):
        if spec.key in model.weights:
            prefix = spec.hf_name[: -len(".weight")]
            w = model.weights[spec.key]
            packed = (awq_tensors(w) if qc["quant_method"] == "awq"
                      else gptq_tensors(w, qc["checkpoint_format"]))
            tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
            continue
        node = model.params
        for k in spec.path:
            node = node[k]
        arr = np.asarray(node, np.float32)
        tensors[spec.hf_name] = np.ascontiguousarray(arr.T if spec.hf_transposed else arr).astype(float_dtype)
    return tensors


def save_quantized(dst: str, model, tokenizer=None, float_dtype=np.float32) -> str:
    """Write `model` (a pipeline.QuantizedModel) to the directory `dst` as an HF checkpoint: model.safetensors,
    config.json with `quantization_config` (+ quantize_config.json, which AutoGPTQ reads) and the tokenizer."""
    from safetensors.numpy import save_file

    os.makedirs(dst, exist_ok=True)
    save_file(checkpoint_tensors(model, float_dtype), os.path.join(dst, SAFETENSORS_FILE), metadata={"format": "pt"})
    qc = model.settings.quantization_config()
    config = {**model.config.to_hf_config(), "torch_dtype": np.dtype(float_dtype).name,
              "quantization_config": qc}
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if qc["quant_method"] == "gptq":
        with open(os.path.join(dst, "quantize_config.json"), "w") as f:
            json.dump(qc, f, indent=2)
    return dst
