"""AWQ (Lin et al., 2023): activation-aware weight quantization of one decoder layer.

A few input channels carry large activations; quantization error on their weights costs the most. AWQ scales
each input channel k of a linear by s_k (W[k] * s_k, and the op producing its input divided by s_k, so the float
layer computes the same function) before group quantization, with s = mean|x|^alpha normalised by
sqrt(max(s) min(s)). alpha is searched over a grid of `n_grid` values in [0, 1) for the one that minimises the
error of the block the scaled linears feed, with those linears fake-quantized. As AutoAWQ does for Llama, the
scaled groups and the op each is folded into are:
  q, k, v   <- input RMSNorm weight     (error of the attention block's output)
  o         <- v (only when v's output is o's input: multi-head attention; GQA models skip it, as AutoAWQ)
  gate, up  <- post-attention RMSNorm   (error of the MLP's output)
  down      <- up                       (error of down's output)
Then, as AutoAWQ's default, each weight except q and k is clipped per group to the max |w| (shrunk by up to
`max_shrink`) that minimises that group's output error, and quantized asymmetrically per group (AWQ's grid).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer.config import ModelConfig
from jaxinfer.quantization.calibration import LayerInputs, attention_block, mlp_block, rope_for
from jaxinfer.quantization.group_quant import (IntWeight, awq_grid, check_settings, codes_of, fake_quantize,
                                               grouped, int_weight)


class ScaleGroup(NamedTuple):
    name: str          # the kind of block whose output error is measured: qkv | o | mlp | down
    linears: tuple     # weights whose input channels are scaled
    prev: str          # the weight the inverse scale is folded into (a norm: its vector; a linear: its columns)
    bias: str | None   # the prev linear's bias, divided too
    input: str         # the LayerInputs field feeding the linears


GROUPS = (ScaleGroup("qkv", ("wq", "wk", "wv"), "attn_norm", None, "attn_in"),
          ScaleGroup("o", ("wo",), "wv", "bv", "o_in"),
          ScaleGroup("mlp", ("w_gate", "w_up"), "mlp_norm", None, "mlp_in"),
          ScaleGroup("down", ("w_down",), "w_up", None, "down_in"))
NO_CLIP = ("wq", "wk")  # AutoAWQ does not clip q and k (their error is amplified through the attention scores)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def awq_fake_quantize(w, bits: int, group_size: int):
    """Fake-quantize `w [K, N]` on AWQ's asymmetric grid, groups of `group_size` inputs."""
    K, N = w.shape
    g = w.reshape(K // group_size, group_size, N)
    scale, zero = jax.vmap(lambda x: awq_grid(x, bits))(g)
    return fake_quantize(g, scale[:, None], zero[:, None], bits).reshape(K, N)


@jax.jit
def scales_for(x_mean, alpha):
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    return s / jnp.sqrt(s.max() * s.min())


@functools.partial(jax.jit, static_argnames=("config", "kind", "bits", "group_size", "quantize"))
def _block_output_error(config, kind, w, x, s, ref, *, bits, group_size, quantize=True):
    """Sum of squared differences between `ref` and the block `kind`'s output on samples `x [C, L, K]`, with the
    block's linears scaled by `s` and fake-quantized (or, with quantize=False, the float output itself)."""
    group = next(g for g in GROUPS if g.name == kind)
    if quantize:
        w = dict(w, **{n: awq_fake_quantize(w[n] * s[:, None], bits, group_size) / s[:, None]
                       for n in group.linears})
    if kind == "qkv":
        cos, sin = rope_for(config, x.shape[1])
        out = jax.vmap(lambda h: attention_block(config, w, h, cos, sin)[1])(x)
    elif kind == "mlp":
        out = jax.vmap(lambda h: mlp_block(w, h)[1])(x)
    else:
        out = jnp.dot(x, w[group.linears[0]], precision=lax.Precision.HIGHEST)
    if not quantize:
        return out
    return jnp.sum(jnp.square(out - ref))


def search_scale(config, group: ScaleGroup, w, x, *, bits: int, group_size: int, n_grid: int = 20,
                 chunk: int = 8):
    """The per-input-channel scale `[K]` of `group` minimising its block's output error over samples x."""
    x_mean = _mean_abs(x)
    kw = dict(bits=bits, group_size=group_size)
    chunks = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]
    ones = jnp.ones_like(x_mean)
    refs = [_block_output_error(config, group.name, w, c, ones, None, quantize=False, **kw) for c in chunks]
    best, best_err = ones, np.inf
    for i in range(n_grid):
        s = scales_for(x_mean, i / n_grid)
        err = sum(float(_block_output_error(config, group.name, w, c, s, r, **kw)) for c, r in zip(chunks, refs))
        if err < best_err:
            best, best_err = s, err
    return best


@jax.jit
def _mean_abs(x):
    return jnp.mean(jnp.abs(x.reshape(-1, x.shape[-1])), axis=0)


@functools.partial(jax.jit, static_argnames=("group",))
def fold_scale(w: dict, group: ScaleGroup, s) -> dict:
    """Scale the group's linears' input rows by s and divide the previous op's output by s (float-exact)."""
    w = dict(w)
    for n in group.linears:
        w[n] = w[n] * s[:, None]
    prev = w[group.prev]
    w[group.prev] = prev / s if prev.ndim == 1 else prev / s[None, :]
    if group.bias and group.bias in w:
        w[group.bias] = w[group.bias] / s
    return w


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "n_grid", "max_shrink"))
def _best_clip(w, x, *, bits, group_size, n_grid, max_shrink):
    """w clipped, per group and output column, to the bound (max |w| times 1 - i/n_grid) minimising the group's
    partial output error on tokens x `[T, K]`."""
    K, N = w.shape
    G = K // group_size
    xg = x.reshape(-1, G, group_size)
    wg = w.reshape(G, group_size, N)
    ref = jnp.einsum("tgk,gkn->tgn", xg, wg, precision=lax.Precision.HIGHEST)
    org_max = jnp.max(jnp.abs(wg), axis=1, keepdims=True)  # [G, 1, N]

    def error(i):
        bound = org_max * (1 - i / n_grid)
        clipped = jnp.clip(wg, -bound, bound)
        scale, zero = jax.vmap(lambda g: awq_grid(g, bits))(clipped)
        q = fake_quantize(clipped, scale[:, None], zero[:, None], bits)
        out = jnp.einsum("tgk,gkn->tgn", xg, q, precision=lax.Precision.HIGHEST)
        return jnp.mean(jnp.square(out - ref), axis=0)  # [G, N]

    errors = lax.map(error, jnp.arange(int(max_shrink * n_grid), dtype=jnp.float32))
    best = jnp.argmin(errors, axis=0).astype(jnp.float32)
    bound = org_max * (1 - best[:, None] / n_grid)  # [G, 1, N]
    return jnp.clip(wg, -bound, bound).reshape(K, N)


def clip_weight(w, x, *, bits: int, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512):
    """w clipped per group to the searched bound, using every (T // n_tokens)-th calibration token (AutoAWQ)."""
    x = x.reshape(-1, x.shape[-1])
    x = x[::max(1, x.shape[0] // n_tokens)]
    return _best_clip(w, x, bits=bits, group_size=group_size, n_grid=n_grid, max_shrink=max_shrink)


def awq_quantize(w, bits: int, group_size: int) -> IntWeight:
    """Final group quantization on AWQ's grid (asymmetric, zero points as they are: the AWQ format)."""
    return int_weight(*_awq_codes(w, bits, group_size), bits, group_size, sym=False)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _awq_codes(w, bits, group_size):
    scale, zero = grouped(lambda g: awq_grid(g, bits), w, group_size)
    codes = codes_of(w.reshape(scale.shape[0], group_size, -1), scale[:, None], zero[:, None], bits)
    return codes.reshape(w.shape), scale, zero


def awq_layer(config: ModelConfig, w: dict, inputs: LayerInputs, *, bits: int = 4, group_size: int = 128,
              n_grid: int = 20, clip: bool = True) -> tuple[dict, dict[str, IntWeight]]:
    """AWQ one decoder layer given its float inputs. Returns the layer's float weights with every scale folded in
    (the norms and any untouched tensors are what the checkpoint stores) and the quantized linears."""
    if bits != 4:
        raise ValueError(f"AWQ writes the 4-bit GEMM format; bits={bits} is not supported")
    feats = inputs._asdict()
    gs = {n: check_settings(w[n].shape[0], bits, group_size) for g in GROUPS for n in g.linears}
    for group in GROUPS:
        if group.name == "o" and w["wv"].shape[1] != w["wo"].shape[0]:
            continue  # grouped-query attention: v's outputs are not o's inputs one to one
        s = search_scale(config, group, w, feats[group.input], bits=bits, group_size=gs[group.linears[0]],
                         n_grid=n_grid)
        w = fold_scale(w, group, s)
        feats[group.input] = feats[group.input] / s
    quantized = {}
    for group in GROUPS:
        for n in group.linears:
            weight = w[n]
            if clip and n not in NO_CLIP:
                weight = clip_weight(weight, feats[group.input], bits=bits, group_size=gs[n], n_grid=n_grid)
            quantized[n] = awq_quantize(weight, bits, gs[n])
    return w, quantized
