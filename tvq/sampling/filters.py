"""Drawing the next token from logits: temperature, top-k and top-p (nucleus) filtering.

Temperature divides the logits first. Top-k then keeps the k most likely tokens, and
top-p keeps the smallest set of the remaining most likely tokens whose probabilities
sum to at least p. The most likely token always survives both. All three settings are
traced values, so changing them does not recompile a decoding loop.

Shapes: B batch, N vocabulary size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit of a filtered-out token: its probability is exactly zero after the softmax.
REMOVED = -jnp.inf


def filter_logits(logits: jnp.ndarray, top_k, top_p) -> jnp.ndarray:
    """Set the logits [B, N] of tokens outside the top-k and the top-p set to -inf.

    top_k <= 0 and top_p >= 1 switch the respective filter off. Among equal logits the
    lower token id ranks first, so the kept set is deterministic.
    """
    B, N = logits.shape
    logits = logits.astype(jnp.float32)
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, N] token ids by rank
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(N)

    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, ranked, REMOVED), axis=-1)
    # A token stays while the tokens ranked above it sum to less than p.
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    # top_p >= 1 keeps everything even where float32 sums reach 1 before the last rank.
    keep = keep & ((top_p >= 1) | (mass_above < top_p) | (rank == 0))

    # Back from rank order to token order.
    keep_by_token = jnp.zeros((B, N), bool).at[jnp.arange(B)[:, None], order].set(keep)
    return jnp.where(keep_by_token, logits, REMOVED)


def sample_tokens(
    key: jax.Array, logits: jnp.ndarray, temperature, top_k, top_p, vocab_size: int | None = None
) -> jnp.ndarray:
    """Draw one token id per row of logits [B, N]; temperature 0 takes the argmax.

    vocab_size, if given, restricts the draw to ids below it: a model may have more
    outputs (n_vocab) than its data has token ids.
    """
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, REMOVED)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)

    # Sorting the vocabulary dominates a small model's step, so it runs only when a
    # filter is on.
    filters_on = (top_k > 0) | (top_p < 1)
    filtered = jax.lax.cond(
        filters_on, lambda x: filter_logits(x, top_k, top_p), lambda x: x, scaled
    )
    drawn = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
