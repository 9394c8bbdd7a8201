"""Timing shared by the throughput benchmarks: compiled steps under a time budget, and
the matmul ceiling (the best GFLOP/s of square matmuls, the reference of MFU on CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


def time_steps(run_step: Callable[[], None], repeats: int, budget_s: float) -> list[float]:
    """Run run_step once as a warm-up, then up to `repeats` more times; return the seconds
    of every step, the warm-up first. Stops after the first step that ends past budget_s,
    counted from the start of the warm-up."""
    seconds = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats + 1):
        start = time.perf_counter()
        run_step()
        seconds.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return seconds


def record_step_times(row, seconds: list[float]) -> None:
    """Set row's status, repeats and step_s_median/min/max from time_steps' seconds.

    The warm-up step is not counted, unless the budget ran out during it: then it is the
    only sample, and the row's status becomes "over budget".
    """
    counted = seconds[1:] or seconds
    if not seconds[1:]:
        row.status = "over budget"
    row.repeats = len(counted)
    row.step_s_median = statistics.median(counted)
    row.step_s_min = min(counted)
    row.step_s_max = max(counted)


def failure_status(error: Exception) -> str:
    """Return a row status for a backend error: "out of memory" or "failed: <first line>"."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "out of memory"
    first_line = (text.strip().splitlines() or [type(error).__name__])[0]
    return f"failed: {first_line[:200]}"
