"""Sinusoidal position features and the Transformer-XL relative position term."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def sinusoid_table(positions: np.ndarray, width: int, wavelength_base: float) -> jnp.ndarray:
    """Return [P, width] sinusoids (sines, then cosines) of the given positions."""
    n_freq = (width + 1) // 2
    inv_freq = wavelength_base ** (-np.arange(n_freq, dtype=np.float64) / n_freq)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, :width]
    return jnp.asarray(table, dtype=jnp.float32)


def sinusoid_row(position: jnp.ndarray, width: int, wavelength_base: float) -> jnp.ndarray:
    """Return the [width] sinusoids of one traced position, as `sinusoid_table` lays them out.

    The angles are float32 here, against float64 in the table, so the two differ by
    about position * 6e-8 in each angle.
    """
    n_freq = (width + 1) // 2
    inv_freq = wavelength_base ** (-np.arange(n_freq, dtype=np.float64) / n_freq)
    angles = position.astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])[:width]


def relative_window_bias(qw: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
    """Position term (q_i + w) . r(i - j) for every query of a block and its 2L-key window.

    Args:
      qw: [..., h, G, L, K] queries of each block, with the position bias vector w added.
      r: [L + 1, h, K] projected position features; r[d] is for distance d.

    Returns:
      [..., h, G, L, 2L] scores for window keys j' (the previous block's L keys, then
      the current block's L keys). Query i sits at window position i + L, so the
      distance is i + L - j'. Distances above L get 0, which is the bias window;
      negative distances (future keys) hold arbitrary values and must be masked.
    """
    *lead, h, G, L, K = qw.shape
    assert r.shape == (L + 1, h, K), (r.shape, qw.shape)

    # Column e of `by_offset` is distance L - e, so the columns run from distance L
    # down to 0 and a key at window position j' reads column j' - i.
    by_offset = jnp.einsum(
        "...hgik,ehk->...hgie", qw, r[::-1].astype(qw.dtype), preferred_element_type=jnp.float32
    )

    # Transformer-XL's relative shift. Pad L - 1 zero columns in front (distances above
    # L) and one spare column behind, then flatten the rows. Reading L rows of 2L from
    # offset L - 1 moves row i left by L - 1 - i, which puts distance i + L - j' at
    # column j'.
    padded = jnp.pad(by_offset, [(0, 0)] * (by_offset.ndim - 1) + [(L - 1, 1)])
    flat = padded.reshape(*lead, h, G, L * (2 * L + 1))
    shifted = flat[..., L - 1 : L - 1 + L * 2 * L]
    return shifted.reshape(*lead, h, G, L, 2 * L)
