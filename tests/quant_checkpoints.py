"""Writers for small quantized checkpoints, written from the formats' specifications with plain Python loops
(independently of jaxinfer's packers), each with its own reference dequantizer:

  GPTQ (HF `quant_method: gptq`): qweight int32 [K * bits / 32, N], row k of the codes in field k % (32 / bits)
      (lowest bits first) of word k // (32 / bits); qzeros int32 [G, N * bits / 32] packed the same way along N,
      holding zero - 1 for checkpoint_format "gptq" and the zero itself for "gptq_v2"; scales f16 [G, N];
      g_idx int32 [K] (row k's group); W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
  AWQ (HF `quant_method: awq`, version gemm): qweight int32 [K, N / 8], column 8j + ORDER[i] in nibble i
      (bits 4i..4i+3) of word j, ORDER = (0, 2, 4, 6, 1, 3, 5, 7); qzeros int32 [G, N / 8] packed the same way;
      scales f16 [G, N]; W[k, n] = scales[k // gs, n] * (q[k, n] - zero[k // gs, n]).
HF stores linear weights [out, in] = W.T.
"""
from __future__ import annotations

import json
import os

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TINY_HF = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, model_type="llama",
               architectures=["LlamaForCausalLM"])
LINEARS = {"self_attn.q_proj": ("hidden", "q"), "self_attn.k_proj": ("hidden", "kv"),
           "self_attn.v_proj": ("hidden", "kv"), "self_attn.o_proj": ("q", "hidden"),
           "mlp.gate_proj": ("hidden", "inter"), "mlp.up_proj": ("hidden", "inter"),
           "mlp.down_proj": ("inter", "hidden")}


def _dims(c):
    return {"hidden": c["hidden_size"], "q": c["num_attention_heads"] * c["head_dim"],
            "kv": c["num_key_value_heads"] * c["head_dim"], "inter": c["intermediate_size"]}


def pack_fields(values, bits: int, order=None) -> np.ndarray:
    """A list of rows of field values -> int32 words, field i of each word from position order[i] of its run."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    out = []
    for row in values:
        words = []
        for start in range(0, len(row), per_word):
            word = 0
            for i in range(per_word):
                word |= (int(row[start + order[i]]) & (2 ** bits - 1)) << (bits * i)
            words.append(word)
        out.append(words)
    return np.array(out, dtype=np.uint64).astype(np.uint32).view(np.int32)


def gptq_tensors(rng, k, n, bits, group_size, sym, act_order, fmt):
    """(tensors, reference W [K, N] float32) for one GPTQ linear."""
    gs = k if group_size == -1 else group_size
    groups = k // gs
    q = rng.integers(0, 2 ** bits, (k, n))
    lo = 1 if fmt == "gptq" else 0  # v1 cannot store a zero point of 0 (zero - 1 wraps)
    zeros = np.full((groups, n), 2 ** (bits - 1)) if sym else rng.integers(lo, 2 ** bits, (groups, n))
    scales = (rng.random((groups, n)) * 0.02 + 0.005).astype(np.float16)
    g_idx = np.arange(k) // gs
    if act_order:  # desc_act: groups were formed in a Hessian-driven column order
        g_idx = g_idx[rng.permutation(k)]
    # packed along K: column c's K codes into K * bits / 32 words, then laid out [K * bits / 32, N]
    qweight = np.ascontiguousarray(pack_fields([list(q[:, c]) for c in range(n)], bits).T)
    stored = zeros - 1 if fmt == "gptq" else zeros
    qzeros = pack_fields([list(stored[g]) for g in range(groups)], bits)
    w = np.empty((k, n), np.float64)
    for row in range(k):
        g = g_idx[row]
        w[row] = scales[g].astype(np.float64) * (q[row] - zeros[g])
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.astype(np.int32)}
    return tensors, w.astype(np.float32)


def awq_tensors(rng, k, n, group_size):
    groups = k // group_size
    q = rng.integers(0, 16, (k, n))
    zeros = rng.integers(0, 16, (groups, n))
    scales = (rng.random((groups, n)) * 0.02 + 0.005).astype(np.float16)
    qweight = pack_fields([list(q[row]) for row in range(k)], 4, AWQ_ORDER)
    qzeros = pack_fields([list(zeros[g]) for g in range(groups)], 4, AWQ_ORDER)
    w = np.empty((k, n), np.float64)
    for row in range(k):
        w[row] = scales[row // group_size].astype(np.float64) * (q[row] - zeros[row // group_size])
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}, w.astype(np.float32)


def write_quantized_pair(root: str, method: str, seed: int = 0, **kw):
    """Write `root/quant` (the quantized checkpoint) and `root/float` (the same model with every quantized
    linear stored as its reference dequantization in f32). Returns (quant_dir, float_dir)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    c = dict(TINY_HF)
    d = _dims(c)
    common = {"model.embed_tokens.weight": rng.standard_normal((c["vocab_size"], d["hidden"])) * 0.5,
              "lm_head.weight": rng.standard_normal((c["vocab_size"], d["hidden"])) * 0.1,
              "model.norm.weight": 1 + 0.1 * rng.standard_normal(d["hidden"])}
    quant, floats = {}, {}
    for layer in range(c["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            common[f"model.layers.{layer}.{norm}.weight"] = 1 + 0.1 * rng.standard_normal(d["hidden"])
        for name, (kin, kout) in LINEARS.items():
            k, n = d[kin], d[kout]
            prefix = f"model.layers.{layer}.{name}"
            if method == "gptq":
                tensors, w = gptq_tensors(rng, k, n, kw["bits"], kw["group_size"], kw["sym"], kw["desc_act"],
                                          kw.get("checkpoint_format", "gptq"))
                if not kw["desc_act"]:
                    tensors["g_idx"] = (np.arange(k) // (k if kw["group_size"] == -1 else kw["group_size"])
                                        ).astype(np.int32)
            else:
                tensors, w = awq_tensors(rng, k, n, kw["group_size"])
            quant.update({f"{prefix}.{part}": arr for part, arr in tensors.items()})
            floats[f"{prefix}.weight"] = w.T  # HF layout [out, in]
    common = {name: np.asarray(v, np.float32) for name, v in common.items()}
    qconfig = ({"quant_method": "gptq", "bits": kw["bits"], "group_size": kw["group_size"], "sym": kw["sym"],
                "desc_act": kw["desc_act"], "checkpoint_format": kw.get("checkpoint_format", "gptq")}
               if method == "gptq" else
               {"quant_method": "awq", "bits": 4, "group_size": kw["group_size"], "version": "gemm",
                "zero_point": True})
    dirs = []
    for sub, tensors, extra in (("quant", quant, {"quantization_config": qconfig}), ("float", floats, {})):
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        save_file({**common, **{k: np.ascontiguousarray(v) for k, v in tensors.items()}},
                  os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**c, **extra}, f)
        dirs.append(path)
    return tuple(dirs)
