"""The compressed cache: per code, how many keys of the older blocks it holds and
the mean of their values.

For a query in block n, every key in blocks 0 .. n-2 was replaced by its codeword, so
attention to all of them collapses to one term per code s: score (q + u) . c_s plus
log(count_s), value the mean of the values whose keys chose s. The sums run in float32
whatever the activation dtype, because bfloat16 counts stop being exact past 256.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def block_code_sums(z: jnp.ndarray, v: jnp.ndarray, n_code: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Count codes and sum values per block.

    Args:
      z: [B, R, L, h] code of each key.
      v: [B, R, L, h, V] values.

    Returns:
      counts [B, R, h, S] and value sums [B, R, h, S, V], both float32.
    """
    one_hot = jax.nn.one_hot(z, n_code, dtype=jnp.float32)
    counts = one_hot.sum(axis=2)
    sums = jnp.einsum("brlhs,brlhv->brhsv", one_hot, v.astype(jnp.float32), precision=HIGHEST)
    return counts, sums


def _shift_blocks(x: jnp.ndarray, shift: int) -> jnp.ndarray:
    """Move the block axis (1) forward by `shift`, filling the first blocks with zeros."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (shift, 0)
    return jnp.pad(x, pad)[:, : x.shape[1]]


def _reduce_serial(x: jnp.ndarray) -> jnp.ndarray:
    def add_block(total, block):
        total = total + block
        return total, total

    _, inclusive = jax.lax.scan(add_block, jnp.zeros_like(x[:, 0]), jnp.moveaxis(x, 1, 0))
    return _shift_blocks(jnp.moveaxis(inclusive, 0, 1), 2)


def _reduce_matmul(x: jnp.ndarray) -> jnp.ndarray:
    n_block = x.shape[1]
    older = jnp.tril(jnp.ones((n_block, n_block), jnp.float32), k=-2)
    return jnp.einsum("nm,bm...->bn...", older, x, precision=HIGHEST)


def _reduce_assoc_scan(x: jnp.ndarray) -> jnp.ndarray:
    inclusive = jax.lax.associative_scan(jnp.add, x, axis=1)
    return _shift_blocks(inclusive, 2)


REDUCTIONS = {"serial": _reduce_serial, "matmul": _reduce_matmul, "assoc_scan": _reduce_assoc_scan}


def compressed_cache(
    z: jnp.ndarray, v: jnp.ndarray, n_code: int, reduction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Build the cache seen by each block from the keys of the blocks two or more back.

    Args:
      z: [B, R, L, h] code of each key.
      v: [B, R, L, h, V] values.
      reduction: "serial", "matmul" or "assoc_scan"; all three give the same sums.

    Returns:
      counts [B, R, h, S] and mean values [B, R, h, S, V] (zero where the count is
      zero), float32, where entry n covers blocks 0 .. n-2.
    """
    reduce = REDUCTIONS[reduction]
    counts, sums = block_code_sums(z, v, n_code)
    counts = reduce(counts)
    sums = reduce(sums)
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return counts, means
