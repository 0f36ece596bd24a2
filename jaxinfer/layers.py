"""Building blocks shared by the Llama family: RMSNorm, RoPE (incl. llama3 / linear scaling), linear."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.quantization.weight import QuantizedWeight, QuantLayout
from jaxinfer.quantization.xla_matmul import QuantMatmulPlan, xla_quant_matmul


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def dot_in_weight_dtype(x, w):
    """x @ w with x cast to the weight's dtype and f32 accumulation, never the reverse: casting the weight to the
    activation dtype would convert the whole matrix every step. bf16 weights with f32 activations (the CPU
    default) run at 1.4-2x the f32 rate on XLA CPU and halve weight memory."""
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)


MATMUL_BACKENDS = ("xla", "pallas", "pallas_interpret")


def linear(x, w, bias=None, *, matmul_backend: str = "xla", quant_plan: QuantMatmulPlan | None = None):
    """y = x @ w (+ bias). `w` is a plain [in, out] array or a packed `QuantizedWeight`, which runs through the
    Pallas kernel (`matmul_backend="pallas"`, GPU; "pallas_interpret" runs it in interpret mode anywhere) or an
    XLA formulation chosen by `quant_plan` for this call's row count (`jaxinfer.quantization.xla_matmul`)."""
    if not isinstance(w, QuantizedWeight):
        y = dot_in_weight_dtype(x, w)
    elif matmul_backend == "xla":
        rows = math.prod(x.shape[:-1])
        formulation = (quant_plan or QuantMatmulPlan()).pick(rows, QuantLayout.of(w), w.shape[0])
        y = xla_quant_matmul(x, w, formulation)
    elif matmul_backend in ("pallas", "pallas_interpret"):
        from pallas_kernels.quant_matmul import quant_matmul

        y = quant_matmul(x, w, interpret=matmul_backend == "pallas_interpret").astype(x.dtype)
    else:
        raise ValueError(f"unknown matmul_backend {matmul_backend!r} (known: {MATMUL_BACKENDS})")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with HF-compatible 'llama3' and 'linear' scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv_freq.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def rope_tables(positions, inv_freq):
    """cos/sin [T, head_dim // 2] for the step's positions; computed once, shared by all layers."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on [T, heads, head_dim] (HF layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
