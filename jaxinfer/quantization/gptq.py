"""GPTQ (Frantar et al., 2022): quantize a linear weight one input row at a time, pushing each row's rounding
error onto the rows not yet quantized through the inverse Hessian of the layer's reconstruction loss.

For a layer y = x @ W (W `[K, N]`, jaxinfer's layout) and calibration inputs X `[T, K]`, the loss
||X W - X Q||^2 has Hessian H = 2 X^T X / T (the same for every output column). Following the paper and
AutoGPTQ: dead inputs (H_kk = 0) are zeroed; optional act-order (desc_act) visits inputs by decreasing H_kk;
H is damped by `percdamp` times its mean diagonal; U is the upper Cholesky factor of H^-1 (H^-1 = U^T U); rows
are processed in blocks, the error of a block reaching later rows in one matmul (lazy batch updates); each
group's grid is fitted when the group is reached, on its rows as updated so far.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.quantization.group_quant import IntWeight, check_settings, codes_of, gptq_grid, int_weight


class Hessian:
    """Accumulates H = 2 X^T X / T over batches of calibration inputs `[..., K]` (in f32)."""

    def __init__(self, k: int):
        self.sum = jnp.zeros((k, k), jnp.float32)
        self.count = 0

    def add(self, x) -> None:
        x = jnp.asarray(x, jnp.float32).reshape(-1, self.sum.shape[0])
        self.sum = _add_outer(self.sum, x)
        self.count += x.shape[0]

    @property
    def value(self):
        return self.sum * (2.0 / max(self.count, 1))


@jax.jit
def _add_outer(h, x):
    return h + jnp.dot(x.T, x, precision=lax.Precision.HIGHEST)


def block_size_for(group_size: int, cap: int = 128) -> int:
    """The lazy-update block: the largest divisor of the group size up to `cap`, so blocks tile groups."""
    return max(d for d in range(1, min(group_size, cap) + 1) if group_size % d == 0)


def gptq(w, h, *, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
         percdamp: float = 0.01, min_zero: int = 0) -> tuple[IntWeight, float]:
    """GPTQ-quantize `w [K, N]` given the Hessian `h [K, K]` of its inputs. Returns the IntWeight (rows in w's
    order, act-order recorded in g_idx) and the loss sum_k ||w_k - q_k||^2 / (2 U_kk^2) the method minimises."""
    w = jnp.asarray(w, jnp.float32)
    gs = check_settings(w.shape[0], bits, group_size)
    codes, scales, zeros, perm, loss = _gptq(w, jnp.asarray(h, jnp.float32), jnp.float32(percdamp), bits=bits,
                                             group_size=gs, block=block_size_for(gs), sym=sym, act_order=act_order,
                                             min_zero=min_zero)
    g_idx = None
    if act_order:  # row perm[j] was quantized j-th, in group j // gs; put the rows back in w's order
        inverse = jnp.argsort(perm)
        codes, g_idx = codes[inverse], inverse // gs
    return int_weight(codes, scales, zeros, bits, gs, sym, g_idx), float(loss)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block", "sym", "act_order", "min_zero"))
def _gptq(w, h, percdamp, *, bits, group_size, block, sym, act_order, min_zero):
    K, N = w.shape
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    perm = jnp.argsort(-diag, stable=True) if act_order else jnp.arange(K)
    w, h = w[perm], h[perm][:, perm]
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(K, dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(K, dtype=h.dtype))
    u = jnp.triu(jnp.linalg.cholesky(h_inv).T)  # upper triangular, h_inv = u^T u

    def group_step(g, carry):
        w, codes, scales, zeros, loss = carry
        scale, zero = gptq_grid(lax.dynamic_slice_in_dim(w, g * group_size, group_size), bits, sym, min_zero)

        def block_step(b, carry):
            w, codes, loss = carry
            start = g * group_size + b * block
            w1 = lax.dynamic_slice_in_dim(w, start, block)
            u1 = lax.dynamic_slice(u, (start, start), (block, block))

            def row_step(i, carry):
                w1, c1, e1, loss = carry
                row, d = w1[i], u1[i, i]
                c = codes_of(row, scale, zero, bits)
                err = (row - (c - zero) * scale) / d
                # u1[i] is zero left of i: rows already done are untouched; row i itself becomes its grid value
                w1 = w1 - u1[i][:, None] * err[None, :]
                return w1, c1.at[i].set(c), e1.at[i].set(err), loss + 0.5 * jnp.sum(err * err)

            zero_block = jnp.zeros((block, N), jnp.float32)
            _, c1, e1, loss = lax.fori_loop(0, block, row_step, (w1, zero_block, zero_block, loss))
            # lazy update of every later row at once; rows of this block and earlier are never read again
            rows = lax.dynamic_slice_in_dim(u, start, block)  # [block, K], zero left of `start`
            w = w - jnp.dot(rows.T, e1, precision=lax.Precision.HIGHEST)
            return w, lax.dynamic_update_slice_in_dim(codes, c1, start, 0), loss

        w, codes, loss = lax.fori_loop(0, group_size // block, block_step, (w, codes, loss))
        return w, codes, scales.at[g].set(scale), zeros.at[g].set(zero), loss

    groups = K // group_size
    init = (w, jnp.zeros((K, N), jnp.float32), jnp.zeros((groups, N), jnp.float32),
            jnp.zeros((groups, N), jnp.float32), jnp.float32(0.0))
    _, codes, scales, zeros, loss = lax.fori_loop(0, groups, group_step, init)
    return codes, scales, zeros, perm, loss
