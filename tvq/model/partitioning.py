"""Sharding constraints on activations, applied only under a device mesh.

Inside `jax.set_mesh(mesh)` with `data` and `model` axes (as tvq.train.step runs its
steps), `constrain` pins an activation's layout so that XLA does not pick a worse one
while propagating the parameters' shardings. Anywhere else (decoding, tests, a
single device) it returns its input unchanged.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Shard axis i of x over mesh axis axes[i] (None: not split) where it divides evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    assert len(axes) == x.ndim, (axes, x.shape)
    sizes = dict(mesh.shape)
    spec = [
        axis if axis in sizes and x.shape[i] % sizes[axis] == 0 else None
        for i, axis in enumerate(axes)
    ]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
