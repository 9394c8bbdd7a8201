"""Compressed cache: per-code counts and mean values of the blocks two or more back."""

import jax.numpy as jnp
import numpy as np
import pytest

from tvq.model.cache import REDUCTIONS, compressed_cache


def reference_cache(z, v, n_code):
    """Counts and means per (batch, block, head, code) over blocks <= n-2, in float64."""
    z, v = np.asarray(z), np.asarray(v, np.float64)
    B, R, L, h = z.shape
    counts = np.zeros((B, R, h, n_code))
    sums = np.zeros((B, R, h, n_code, v.shape[-1]))
    for n in range(2, R):
        for b in range(B):
            for head in range(h):
                codes = z[b, : n - 1, :, head].reshape(-1)
                values = v[b, : n - 1, :, head].reshape(-1, v.shape[-1])
                np.add.at(counts[b, n, head], codes, 1.0)
                np.add.at(sums[b, n, head], codes, values)
    means = sums / np.maximum(counts, 1.0)[..., None]
    return counts, means


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_cache_matches_reference(reduction):
    rng = np.random.default_rng(0)
    z = rng.integers(0, 5, size=(2, 6, 3, 2))
    v = rng.normal(size=(2, 6, 3, 2, 4))
    counts, means = compressed_cache(jnp.asarray(z), jnp.asarray(v, jnp.float32), 5, reduction)
    expected_counts, expected_means = reference_cache(z, v, 5)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(means, expected_means, rtol=1e-6, atol=1e-6)
    assert not counts[:, :2].any()


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_bfloat16_counts_stay_exact(reduction):
    # Two codes over 16 blocks of 512 keys: counts reach thousands, far past the 256
    # up to which bfloat16 holds every integer.
    rng = np.random.default_rng(1)
    z = rng.integers(0, 2, size=(1, 16, 512, 1))
    v = rng.normal(size=(1, 16, 512, 1, 3))
    v_bf16 = jnp.asarray(v, jnp.bfloat16)
    counts, means = compressed_cache(jnp.asarray(z), v_bf16, 2, reduction)
    expected_counts, expected_means = reference_cache(z, np.asarray(v_bf16, np.float32), 2)

    assert counts.dtype == jnp.float32
    assert expected_counts.max() > 3000
    assert not np.all(expected_counts == np.asarray(jnp.asarray(expected_counts, jnp.bfloat16)))
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(means, expected_means, rtol=1e-4, atol=1e-5)
