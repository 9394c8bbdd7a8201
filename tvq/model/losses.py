"""Language-modelling losses."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Mean next-token cross-entropy in nats over the positions where mask is true.

    logits [B, T, N] float32, targets [B, T] int, mask [B, T] bool (all true if None).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
