"""Attention for one new token at a time, with the state that replaces the past.

The state of one attention sublayer is a dict of arrays whose shapes are fixed when
decoding starts:

- VQ attention (`vq_decode_state`): the quantised keys, values and codes of the
  previous and the current block in a window of 2L slots, and per code the count and
  the value sum of every older key. Its size does not depend on how many tokens were
  decoded, so each token costs the same.
- Full attention (`full_decode_state`): an ordinary key/value cache with one slot per
  position up to a fixed capacity.

Both hold `position`, the number of tokens already decoded, and `r`, the projected
relative position features [L + 1, h, K], computed once from the parameters.

Shapes: B batch, h key/value heads, G query heads per key/value head, K key width,
V value width, L block length, S codebook size, C cache capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tvq.model.attention import MASKED_SCORE
from tvq.model.cache import block_code_sums

State = dict[str, jnp.ndarray]

# A state's position is int32, so a decoded sequence has fewer tokens than this.
MAX_POSITIONS = 2**31 - 1

# The arrays of each state, in the order the layers declare them as "cache" variables.
VQ_STATE_KEYS = ("position", "r", "k_window", "v_window", "z_window", "counts", "sums")
FULL_STATE_KEYS = ("position", "r", "k_cache", "v_cache")


def vq_decode_state(batch_size, n_head, d_k, d_v, n_code, block_len, dtype, r) -> State:
    """Return the empty VQ decoding state: no token decoded, an empty cache."""
    B, h, K, V, S, L = batch_size, n_head, d_k, d_v, n_code, block_len
    return {
        "position": jnp.zeros((), jnp.int32),
        "r": r,
        "k_window": jnp.zeros((B, h, 2 * L, K), dtype),
        "v_window": jnp.zeros((B, h, 2 * L, V), dtype),
        "z_window": jnp.zeros((B, h, 2 * L), jnp.int32),
        "counts": jnp.zeros((B, h, S), jnp.float32),
        "sums": jnp.zeros((B, h, S, V), jnp.float32),
    }


def full_decode_state(batch_size, n_head, d_k, d_v, capacity, dtype, r) -> State:
    """Return the empty key/value cache for `capacity` positions."""
    B, h, K, V, C = batch_size, n_head, d_k, d_v, capacity
    return {
        "position": jnp.zeros((), jnp.int32),
        "r": r,
        "k_cache": jnp.zeros((B, h, C, K), dtype),
        "v_cache": jnp.zeros((B, h, C, V), dtype),
    }


def _position_scores(qw: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
    """[B, h, G, L + 1] position term (q + w) . r(d) for every distance d in 0 .. L."""
    return jnp.einsum("bhgk,dhk->bhgd", qw, r.astype(qw.dtype), preferred_element_type=jnp.float32)


def _attend(scores_parts, value_parts, dtype) -> jnp.ndarray:
    """One softmax over all score parts; return the [B, h, G, V] weighted value sum.

    Each part is (scores [B, h, G, J], values [B, h, J, V]). The weights are cast to the
    values' dtype and normalised after the weighted sum, as the block-wise kernel does.
    """
    max_score = jnp.max(jnp.stack([s.max(-1) for s in scores_parts]), axis=0)[..., None]
    out = 0.0
    normaliser = 0.0
    for scores, values in zip(scores_parts, value_parts, strict=True):
        weights = jnp.exp(scores - max_score)
        normaliser = normaliser + weights.sum(-1)
        out = out + jnp.einsum(
            "bhgj,bhjv->bhgv", weights.astype(dtype), values.astype(dtype),
            preferred_element_type=jnp.float32,
        )
    return out / normaliser[..., None]


def _roll_blocks(state: State, n_code: int) -> State:
    """Start a new block: the block two back enters the cache, the window moves by L."""
    L = state["k_window"].shape[2] // 2
    block = state["position"] // L

    # At the start of block n the window's first half holds block n - 2, which exists
    # only from n = 2 on; before that it is zeros that must not be counted as code 0.
    older_z = state["z_window"][:, :, :L]
    older_v = state["v_window"][:, :, :L]
    counts, sums = block_code_sums(
        jnp.einsum("bhl->blh", older_z)[:, None], jnp.einsum("bhlv->blhv", older_v)[:, None],
        n_code,
    )  # [B, 1, h, S], [B, 1, h, S, V]
    weight = (block >= 2).astype(jnp.float32)

    def shift(window):
        tail = jnp.zeros_like(window[:, :, :L])
        return jnp.concatenate([window[:, :, L:], tail], axis=2)

    return {
        **state,
        "counts": state["counts"] + weight * counts[:, 0],
        "sums": state["sums"] + weight * sums[:, 0],
        "k_window": shift(state["k_window"]),
        "v_window": shift(state["v_window"]),
        "z_window": shift(state["z_window"]),
    }


def vq_decode_step(
    state: State,
    q: jnp.ndarray,
    k_hat: jnp.ndarray,
    v: jnp.ndarray,
    z: jnp.ndarray,
    codebook: jnp.ndarray,
    u: jnp.ndarray,
    w: jnp.ndarray,
) -> tuple[jnp.ndarray, State]:
    """Attend from the token at state["position"] and add it to the state.

    Args:
      q: [B, h, G, K] query; k_hat [B, h, K] its codeword key; v [B, h, V]; z [B, h].
      codebook: [h, S, K]; u, w: [h, G, K].

    Returns:
      the [B, h, G, V] output (dtype of v) and the state one position later. The output
      equals what `vq_attention` computes for this position over the whole sequence.
    """
    B, h, G, K = q.shape
    S = codebook.shape[1]
    L = state["k_window"].shape[2] // 2
    assert k_hat.shape == (B, h, K), (k_hat.shape, q.shape)
    assert z.shape == (B, h), (z.shape, q.shape)
    assert v.shape[:2] == (B, h), (v.shape, q.shape)
    assert codebook.shape == (h, S, K), (codebook.shape, q.shape)

    # Only the first token of a block rolls the window, so the other L - 1 skip the
    # [S, V] update through the branch not taken.
    position = state["position"]
    block, offset = position // L, position % L
    state = jax.lax.cond(
        (offset == 0) & (block > 0), lambda s: _roll_blocks(s, S), lambda s: s, state
    )
    slot = L + offset
    k_window = jax.lax.dynamic_update_slice_in_dim(
        state["k_window"], k_hat[:, :, None].astype(state["k_window"].dtype), slot, axis=2
    )
    v_window = jax.lax.dynamic_update_slice_in_dim(
        state["v_window"], v[:, :, None].astype(state["v_window"].dtype), slot, axis=2
    )
    z_window = jax.lax.dynamic_update_slice_in_dim(state["z_window"], z[:, :, None], slot, axis=2)

    # Window slot j contains the key at distance L + offset - j. The position term covers
    # distances 0 .. L (slots offset .. L + offset); slots after the query are future
    # keys, and the previous half is empty in block 0.
    qu = q + u.astype(q.dtype)
    qw = q + w.astype(q.dtype)
    window_scores = jnp.einsum(
        "bhgk,bhjk->bhgj", qu, k_window, preferred_element_type=jnp.float32
    )
    slots = jnp.arange(2 * L)
    distance = slot - slots
    in_bias_window = (distance >= 0) & (distance <= L)
    position_scores = jnp.take(
        _position_scores(qw, state["r"]), jnp.clip(distance, 0, L), axis=-1
    )
    window_scores = window_scores + jnp.where(in_bias_window, position_scores, 0.0)
    visible = (distance >= 0) & ((block > 0) | (slots >= L))
    window_scores = jnp.where(visible, window_scores, MASKED_SCORE)

    # The cache covers blocks <= n - 2, farther than L from every query of block n.
    counts = state["counts"]
    log_counts = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), MASKED_SCORE)
    cache_scores = jnp.einsum(
        "bhgk,hsk->bhgs", qu, codebook.astype(q.dtype), preferred_element_type=jnp.float32
    )
    cache_scores = cache_scores + log_counts[:, :, None, :]
    means = state["sums"] / jnp.maximum(counts, 1.0)[..., None]

    out = _attend([window_scores, cache_scores], [v_window, means], v.dtype)
    new_state = {
        **state,
        "position": position + 1,
        "k_window": k_window,
        "v_window": v_window,
        "z_window": z_window,
    }
    return out.astype(v.dtype), new_state


def full_decode_step(
    state: State, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, u: jnp.ndarray, w: jnp.ndarray
) -> tuple[jnp.ndarray, State]:
    """Attend from the token at state["position"] over the key/value cache.

    Shapes as in `vq_decode_step`. The caller keeps the position below the capacity C:
    `jax.lax.dynamic_update_slice` would silently clamp a write past the end.

    NOTE: under the model's scan over layers, the compiled step copies each layer's
    [B, h, C, K] and [B, h, C, V] cache instead of updating it in place. This baseline's
    per-token time therefore grows faster with C than reading the cache requires.
    """
    B, h, G, K = q.shape
    C = state["k_cache"].shape[2]
    L = state["r"].shape[0] - 1
    assert k.shape == (B, h, K), (k.shape, q.shape)
    assert v.shape[:2] == (B, h), (v.shape, q.shape)

    position = state["position"]
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        state["k_cache"], k[:, :, None].astype(state["k_cache"].dtype), position, axis=2
    )
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        state["v_cache"], v[:, :, None].astype(state["v_cache"].dtype), position, axis=2
    )

    scores = jnp.einsum(
        "bhgk,bhjk->bhgj", q + u.astype(q.dtype), k_cache, preferred_element_type=jnp.float32
    )
    distance = position - jnp.arange(C)
    in_bias_window = (distance >= 0) & (distance <= L)
    position_scores = jnp.take(
        _position_scores(q + w.astype(q.dtype), state["r"]), jnp.clip(distance, 0, L), axis=-1
    )
    scores = scores + jnp.where(in_bias_window, position_scores, 0.0)
    scores = jnp.where(distance >= 0, scores, MASKED_SCORE)

    out = _attend([scores], [v_cache], v.dtype)
    new_state = {**state, "position": position + 1, "k_cache": k_cache, "v_cache": v_cache}
    return out.astype(v.dtype), new_state
