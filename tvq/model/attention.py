"""Attention kernels with Transformer-XL relative biases.

All kernels take queries grouped by key/value head and compute, for query i and key j,

    score(i, j) = (q_i + u) . k_j + [0 <= i - j <= L] (q_i + w) . r(i - j)

over causal keys, with one softmax in float32. The inputs are q [B, T, h, G, K],
k [B, T, h, K], v [B, T, h, V], u and w [h, G, K] and r [L + 1, h, K]. The output is
[B, T, h, G, V] in the dtype of v.

- `vq_attention`: linear time. Keys must be codewords (k_j = c_{z_j}). A query in block
  n attends exactly to blocks n-1 and n and to the compressed cache of blocks <= n-2.
  It scans over query blocks, so only one block's scores are live at a time.
- `quadratic_attention`: materialises all T x T scores; the oracle for the above when
  given the same quantised keys.
- `full_attention`: the quadratic-time baseline, one query block at a time so that
  memory stays O(L T).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from tvq.model.cache import compressed_cache
from tvq.model.positions import relative_window_bias

# XLA's cost analysis counts a loop body once, whatever its trip count, so FLOP checks
# trace vq_attention and full_attention with their block scans unrolled (see tvq.bench.flops).
_UNROLL_BLOCK_SCAN = contextvars.ContextVar("unroll_block_scan", default=False)


@contextlib.contextmanager
def unrolled_block_scan():
    """Trace vq_attention and full_attention with their block scans unrolled while inside."""
    token = _UNROLL_BLOCK_SCAN.set(True)
    try:
        yield
    finally:
        _UNROLL_BLOCK_SCAN.reset(token)

# Masked scores: finite, so that masked entries get zero probability and zero gradient
# without producing inf - inf.
MASKED_SCORE = -1e30


def _check_shapes(q, k, v, u, w, r, block_len):
    B, T, h, G, K = q.shape
    assert k.shape == (B, T, h, K), (k.shape, q.shape)
    assert v.shape[:3] == (B, T, h), (v.shape, q.shape)
    assert u.shape == w.shape == (h, G, K), (u.shape, w.shape, q.shape)
    assert r.shape == (block_len + 1, h, K), (r.shape, block_len)
    assert T % block_len == 0, (T, block_len)


def _blocks(x: jnp.ndarray, block_len: int) -> jnp.ndarray:
    """[B, T, ...] -> [B, R, L, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // block_len, block_len, *x.shape[2:])


def _head_major_blocks(x: jnp.ndarray, block_len: int) -> jnp.ndarray:
    """[B, T, h, ..., C] -> [B, R, h, ..., L, C], so each einsum is a plain batched matmul."""
    x = _blocks(x, block_len)
    return jnp.moveaxis(x, 2, -2)


def _block_window_mask(n: jnp.ndarray, block_len: int) -> jnp.ndarray:
    """[L, 2L] True where window key j' is visible to query i of block n."""
    query = jnp.arange(block_len)[:, None]
    key = jnp.arange(2 * block_len)[None, :]
    causal = key <= query + block_len
    exists = (n > 0) | (key >= block_len)
    return causal & exists


def vq_attention(
    q: jnp.ndarray,
    k_hat: jnp.ndarray,
    v: jnp.ndarray,
    z: jnp.ndarray,
    codebook: jnp.ndarray,
    u: jnp.ndarray,
    w: jnp.ndarray,
    r: jnp.ndarray,
    *,
    block_len: int,
    reduction: str,
) -> jnp.ndarray:
    """Linear-time attention over quantised keys k_hat = codebook[z] (see module doc).

    z is [B, T, h] and codebook [h, S, K]. Gradients reach keys only through the two
    exact blocks, because the cache scores use the codebook, which is not trained by
    gradient.
    """
    _check_shapes(q, k_hat, v, u, w, r, block_len)
    B, T, h, G, K = q.shape
    L = block_len
    R = T // L
    S = codebook.shape[1]
    assert z.shape == (B, T, h), (z.shape, q.shape)
    assert codebook.shape == (h, S, K), (codebook.shape, q.shape)

    # Block axis first for the scan over blocks.
    qu = jnp.moveaxis(_head_major_blocks(q + u.astype(q.dtype), L), 1, 0)  # [R, B, h, G, L, K]
    qw = jnp.moveaxis(_head_major_blocks(q + w.astype(q.dtype), L), 1, 0)
    k_blocks = jnp.moveaxis(_head_major_blocks(k_hat, L), 1, 0)  # [R, B, h, L, K]
    v_blocks = jnp.moveaxis(_head_major_blocks(v, L), 1, 0)  # [R, B, h, L, V]

    # The compressed cache covers blocks <= n-2, which are farther than L from every
    # query of block n, so its scores carry no position term.
    counts, means = compressed_cache(_blocks(z, L), _blocks(v, L), S, reduction)
    log_counts = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), MASKED_SCORE)
    log_counts = jnp.moveaxis(log_counts, 1, 0)  # [R, B, h, S]
    means = jnp.moveaxis(means, 1, 0)  # [R, B, h, S, V]
    codes = codebook.astype(q.dtype)

    # One block per scan step, rematerialised in the backward pass, so that the scores
    # and weights of only one block are live at a time: memory grows with T only through
    # the inputs and the cache.
    @jax.checkpoint
    def attend_block(n, qu_n, qw_n, k_n, v_n, k_previous, v_previous, log_counts_n, means_n):
        # Exact part: the previous block's keys, then this block's.
        k_window = jnp.concatenate([k_previous, k_n], axis=-2)  # [B, h, 2L, K]
        v_window = jnp.concatenate([v_previous, v_n], axis=-2)  # [B, h, 2L, V]
        window_scores = jnp.einsum(
            "bhgik,bhjk->bhgij", qu_n, k_window, preferred_element_type=jnp.float32
        )
        window_scores = window_scores + relative_window_bias(qw_n, r)
        window_scores = jnp.where(_block_window_mask(n, L), window_scores, MASKED_SCORE)

        # Compressed part: one score per code, weighted by how many keys chose it.
        cache_scores = jnp.einsum(
            "bhgik,hsk->bhgis", qu_n, codes, preferred_element_type=jnp.float32
        )
        cache_scores = cache_scores + log_counts_n[:, :, None, None, :]

        # One softmax over both parts, normalised after the weighted sums.
        max_score = jnp.maximum(window_scores.max(-1), cache_scores.max(-1))
        max_score = jax.lax.stop_gradient(max_score)[..., None]
        window_weights = jnp.exp(window_scores - max_score)
        cache_weights = jnp.exp(cache_scores - max_score)
        normaliser = window_weights.sum(-1) + cache_weights.sum(-1)

        out = jnp.einsum(
            "bhgij,bhjv->bhgiv", window_weights.astype(v.dtype), v_window,
            preferred_element_type=jnp.float32,
        )
        out = out + jnp.einsum(
            "bhgis,bhsv->bhgiv", cache_weights.astype(v.dtype), means_n.astype(v.dtype),
            preferred_element_type=jnp.float32,
        )
        return out / normaliser[..., None]

    def step(previous, inputs):
        n, qu_n, qw_n, k_n, v_n, log_counts_n, means_n = inputs
        out = attend_block(n, qu_n, qw_n, k_n, v_n, *previous, log_counts_n, means_n)
        return (k_n, v_n), out

    # Block 0 has no previous block: its zero keys and values are masked out.
    first = (jnp.zeros_like(k_blocks[0]), jnp.zeros_like(v_blocks[0]))
    unroll = R if _UNROLL_BLOCK_SCAN.get() else 1
    _, out = jax.lax.scan(
        step, first, (jnp.arange(R), qu, qw, k_blocks, v_blocks, log_counts, means),
        unroll=unroll,
    )  # [R, B, h, G, L, V]
    out = jnp.einsum("rbhgiv->brihgv", out).reshape(B, T, h, G, v.shape[-1])
    return out.astype(v.dtype)


def quadratic_attention(q, k, v, u, w, r, *, block_len: int) -> jnp.ndarray:
    """Plain causal softmax attention with all T x T scores materialised."""
    _check_shapes(q, k, v, u, w, r, block_len)
    T = q.shape[1]

    scores = jnp.einsum(
        "bihgk,bjhk->bhgij", q + u.astype(q.dtype), k, preferred_element_type=jnp.float32
    )
    by_distance = jnp.einsum(
        "bihgk,dhk->bhgid", q + w.astype(q.dtype), r.astype(q.dtype),
        preferred_element_type=jnp.float32,
    )
    distance = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    in_window = (distance >= 0) & (distance <= block_len)
    index = jnp.broadcast_to(jnp.clip(distance, 0, block_len), scores.shape)
    position = jnp.take_along_axis(by_distance, index, axis=-1)
    scores = scores + jnp.where(in_window, position, 0.0)
    scores = jnp.where(distance >= 0, scores, MASKED_SCORE)

    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhgij,bjhv->bihgv", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.astype(v.dtype)


def full_attention(q, k, v, u, w, r, *, block_len: int) -> jnp.ndarray:
    """Quadratic-time causal attention, scanning over query blocks of length L.

    Each step scores one query block against all T keys (future keys are computed and
    masked, as dense attention does), and is rematerialised in the backward pass so
    that only one [L, T] score matrix is live at a time.
    """
    _check_shapes(q, k, v, u, w, r, block_len)
    B, T, h, G, K = q.shape
    L = block_len
    R = T // L
    # Block axis first for the scan; keys and values head-major once, outside it.
    qu = jnp.moveaxis(_head_major_blocks(q + u.astype(q.dtype), L), 1, 0)  # [R, B, h, G, L, K]
    qw = jnp.moveaxis(_head_major_blocks(q + w.astype(q.dtype), L), 1, 0)
    k_heads = jnp.einsum("bjhk->bhjk", k)
    v_heads = jnp.einsum("bjhv->bhjv", v)

    @jax.checkpoint
    def attend_block(n, qu_n, qw_n):
        scores = jnp.einsum(
            "bhgik,bhjk->bhgij", qu_n, k_heads, preferred_element_type=jnp.float32
        )

        # The position term covers keys (n-1)L .. (n+1)L - 1; padding L columns in front
        # keeps that window in range for block 0, whose previous block does not exist.
        position = relative_window_bias(qw_n, r)
        padded = jnp.zeros(scores.shape[:-1] + (T + L,), jnp.float32)
        padded = jax.lax.dynamic_update_slice_in_dim(padded, position, n * L, axis=-1)
        scores = scores + padded[..., L:]

        visible = jnp.arange(T)[None, :] <= n * L + jnp.arange(L)[:, None]
        scores = jnp.where(visible, scores, MASKED_SCORE)
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum(
            "bhgij,bhjv->bhgiv", weights.astype(v.dtype), v_heads,
            preferred_element_type=jnp.float32,
        )

    def step(carry, inputs):
        return carry, attend_block(*inputs)

    unroll = R if _UNROLL_BLOCK_SCAN.get() else 1
    # out: [R, B, h, G, L, V]
    _, out = jax.lax.scan(step, None, (jnp.arange(R), qu, qw), unroll=unroll)
    out = jnp.einsum("rbhgiv->brihgv", out).reshape(B, T, h, G, v.shape[-1])
    return out.astype(v.dtype)
