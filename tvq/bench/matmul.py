"""The matmul ceiling: the best GFLOP/s of square matmuls, the reference of MFU on CPU."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def time_matmul(size: int, dtype: str, repeats: int = 5) -> float:
    """Time a square [size, size] matmul in dtype and return its median GFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(seconds) / 1e9


def matmul_ceiling(dtype: str, max_size: int) -> float:
    """Return the best GFLOP/s of square matmuls of side max_size, max_size/2 and max_size/4.

    The fastest size differs between machines (cache sizes, threading), so the ceiling
    is the best of a few.
    """
    sizes = sorted({max(max_size // 4, 1), max(max_size // 2, 1), max_size})
    return max(time_matmul(size, dtype) for size in sizes)
