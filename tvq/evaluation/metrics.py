"""Metrics from a split's summed cross-entropy (in nats) and its counts.

Each metric divides the same total loss by a different count: bits per byte by the
split's bytes (enwik8, byte-level text), bits per dimension by its subpixels
(ImageNet64, one token per subpixel), word-level perplexity by its words (PG-19).
"""

from __future__ import annotations

import math


def _check(total_nats: float, count: int, name: str) -> None:
    if count <= 0:
        raise ValueError(f"{name} must be positive to compute a metric, got {count}")
    if not math.isfinite(total_nats) or total_nats < 0:
        raise ValueError(
            f"total loss must be a finite, non-negative number of nats, got {total_nats}"
        )


def bits_per_unit(total_nats: float, units: int) -> float:
    """Return total_nats / units in bits: bits per byte, per dimension or per token."""
    _check(total_nats, units, "the number of units")
    return total_nats / units / math.log(2)


def perplexity(total_nats: float, units: int) -> float:
    """Return exp(total_nats / units): token-level or word-level perplexity."""
    _check(total_nats, units, "the number of units")
    return math.exp(total_nats / units)
