"""Calibration for the quantizers: sample text, and run the float model densely, one decoder layer at a time.

GPTQ and AWQ need each linear layer's input activations on real text. The engine's model computes attention over
the paged KV cache of a flat ragged batch; calibration instead runs N equal-length samples `[N, L, hidden]`
through one layer at a time with plain causal attention, so a quantizer can swap a layer's weights and rerun it.
The layer math is jaxinfer.layers' (rms_norm, apply_rope, linear, rope tables); only the attention differs, and
`dense_logits` is held to the engine's model by tests/test_quantizers.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.layers import apply_rope, linear, rms_norm, rope_inv_freq, rope_tables

# Which activation feeds each linear weight of a decoder layer (the keys of LayerInputs).
INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "o_in",
            "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "down_in"}
# Linears that share an input, in the order the layer uses them (GPTQ's "true sequential" order).
SEQUENTIAL_GROUPS = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


class LayerInputs(NamedTuple):
    """The input of every linear of one decoder layer, each `[N, L, features]`."""
    attn_in: jax.Array   # RMSNorm(x): input of q, k, v
    o_in: jax.Array      # attention output: input of o
    mlp_in: jax.Array    # RMSNorm(x + attn): input of gate, up
    down_in: jax.Array   # silu(gate) * up: input of down


def calibration_samples(tokenizer, path: str, num_samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets of the text in `path`: int32 `[N, L]`.
    Only as much of the file is tokenized as the windows could need (a generous multiple), not all of it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    budget = max(8 * num_samples * seq_len * 6, 200_000)  # characters: ~4-5 per token, with room to spread
    ids = np.asarray(tokenizer.encode(text[:budget], add_special_tokens=False), np.int32)
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, num_samples)
    return np.stack([ids[s:s + seq_len] for s in starts])


def embed(config: ModelConfig, params, token_ids) -> jax.Array:
    """Token embeddings `[N, L, hidden]` in f32 (tied models keep the table as the LM head's columns)."""
    ids = jnp.asarray(token_ids)
    if config.tie_word_embeddings:
        return jnp.take(jnp.asarray(params["lm_head"], jnp.float32), ids, axis=1).transpose(1, 2, 0)
    return jnp.asarray(params["embed"], jnp.float32)[ids]


def rope_for(config: ModelConfig, seq_len: int):
    """cos/sin `[L, head_dim // 2]` for positions 0..L-1 (every calibration sample starts at 0)."""
    return rope_tables(jnp.arange(seq_len), rope_inv_freq(config))


def causal_attention(q, k, v, sliding_window=None):
    """Plain causal attention for one sample: q `[L, H, D]`, k/v `[L, KVH, D]` (grouped-query) -> `[L, H, D]`."""
    L, H, D = q.shape
    group = H // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * D ** -0.5
    i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    allowed = j <= i
    if sliding_window:
        allowed &= i - j < sliding_window
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def attention_block(config: ModelConfig, w: dict, hn, cos, sin):
    """Self-attention of one sample after the input norm: hn `[L, hidden]` -> (o_proj input, o_proj output)."""
    c, L = config, hn.shape[0]
    q = linear(hn, w["wq"], w.get("bq")).reshape(L, c.num_heads, c.head_dim)
    k = linear(hn, w["wk"], w.get("bk")).reshape(L, c.num_kv_heads, c.head_dim)
    v = linear(hn, w["wv"], w.get("bv")).reshape(L, c.num_kv_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = causal_attention(q, k, v, c.sliding_window).reshape(L, c.num_heads * c.head_dim)
    return attn, linear(attn, w["wo"])


def mlp_block(w: dict, hn):
    """SwiGLU MLP after the post-attention norm -> (down_proj input, down_proj output)."""
    act = jax.nn.silu(linear(hn, w["w_gate"])) * linear(hn, w["w_up"])
    return act, linear(act, w["w_down"])


def decoder_layer(config: ModelConfig, w: dict, x, cos, sin):
    """One decoder layer on one sample `[L, hidden]` (weights plain or packed): (output, LayerInputs)."""
    hn = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
    attn, o = attention_block(config, w, hn, cos, sin)
    x = x + o
    hn2 = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
    act, down = mlp_block(w, hn2)
    return x + down, LayerInputs(hn, attn, hn2, act)


@functools.partial(jax.jit, static_argnames=("config", "capture"))
def _layer_chunk(config, w, x, cos, sin, capture):
    out, inputs = jax.vmap(lambda s: decoder_layer(config, w, s, cos, sin))(x)
    return out, (inputs if capture else None)


def run_layer(config: ModelConfig, w: dict, x, *, capture: bool = False, chunk: int = 8):
    """Run decoder layer weights `w` over all samples `x [N, L, hidden]`, `chunk` samples per jitted call (bounds
    the `[chunk, heads, L, L]` attention scores). Returns (output `[N, L, hidden]`, LayerInputs or None)."""
    cos, sin = rope_for(config, x.shape[1])
    outs, captured = [], []
    for start in range(0, x.shape[0], chunk):
        out, inputs = _layer_chunk(config, w, x[start:start + chunk], cos, sin, capture)
        outs.append(out)
        captured.append(inputs)
    out = jnp.concatenate(outs)
    if not capture:
        return out, None
    return out, LayerInputs(*(jnp.concatenate(parts) for parts in zip(*captured)))


def layer_weights(params, layer: int) -> dict:
    return dict(params[f"layers_{layer}"])


def dense_logits(config: ModelConfig, params, token_ids) -> jax.Array:
    """Logits `[N, L, vocab]` of the whole model run densely layer by layer (what calibration computes)."""
    x = embed(config, params, token_ids)
    for i in range(config.num_layers):
        x, _ = run_layer(config, layer_weights(params, i), x)
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return linear(x, params["lm_head"])
