"""The vocabulary split over mesh axes (vocab-parallel embedding, LM head and sampler).

`VocabShard(axes)` says which slice of the vocabulary the last axis of an array holds inside `shard_map` over
`axes`: shard i (the linear index over `axes`, major to minor) holds ids [i * n, (i + 1) * n). Its helpers reduce
over the vocabulary by reducing locally and combining the per-row results across shards, so no caller ever
gathers a full vocabulary. With axes=() the array is the whole vocabulary and each helper is the plain local op.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax


class VocabShard(NamedTuple):
    """Mesh axes the vocabulary is split over; () = the whole vocabulary is here."""
    axes: tuple[str, ...] = ()

    def offset(self, local_size: int):
        """The first vocabulary id of this shard."""
        return lax.axis_index(self.axes) * local_size if self.axes else 0

    def size(self, local_size: int) -> int:
        return local_size * (lax.axis_size(self.axes) if self.axes else 1)

    def max(self, x):  # over the vocabulary (last axis)
        return self.pmax(jnp.max(x, axis=-1))

    def min(self, x):
        r = jnp.min(x, axis=-1)
        return lax.pmin(r, self.axes) if self.axes else r

    def sum(self, x):
        return self.psum(jnp.sum(x, axis=-1))

    def pmax(self, r):
        return lax.pmax(r, self.axes) if self.axes else r

    def psum(self, r):
        return lax.psum(r, self.axes) if self.axes else r

    def gather(self, x):
        """Concatenate the shards' [..., n] pieces along the last axis, in vocabulary order."""
        return lax.all_gather(x, self.axes, axis=x.ndim - 1, tiled=True) if self.axes else x


WHOLE_VOCAB = VocabShard()
