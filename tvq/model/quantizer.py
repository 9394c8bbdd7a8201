"""Vector quantiser for keys, with a codebook kept as exponential moving averages.

The codebook is not a parameter. It lives in the "codebook" variable collection as a
running sum of assigned keys and a running count per code. Applying a training batch
with that collection mutable updates both, and the optimiser never receives them.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tvq.model.cache import HIGHEST

# Floor of a code's running count when dividing, so that a code no key has chosen for
# a long time keeps a finite codeword instead of 0/0.
MIN_COUNT = 0.01


class Quantized(NamedTuple):
    k_hat: jnp.ndarray  # [B, T, h, K] codewords, with the gradient of the keys
    codes: jnp.ndarray  # [B, T, h] int32
    codebook: jnp.ndarray  # [h, S, K] float32, the codebook that produced `codes`
    commit_loss: jnp.ndarray  # scalar, already multiplied by c_beta
    perplexity: jnp.ndarray  # scalar: exp(entropy) of the batch's code frequencies
    usage: jnp.ndarray  # scalar: fraction of codes chosen at least once in the batch


def nearest_codes(keys: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
    """Return [B, T, h] indices of the nearest codewords in float32 squared distance."""
    keys = keys.astype(jnp.float32)
    cross = jnp.einsum("bthk,hsk->bths", keys, codebook, precision=HIGHEST)
    distances = (
        jnp.sum(keys**2, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(codebook**2, axis=-1)
    )
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def codebook_from_stats(code_sums: jnp.ndarray, code_counts: jnp.ndarray) -> jnp.ndarray:
    """Return [h, S, K] codewords as running sums over floored running counts."""
    return code_sums / jnp.maximum(code_counts, MIN_COUNT)[..., None]


class VectorQuantizer(nn.Module):
    n_head: int
    n_code: int
    d_k: int
    c_beta: float
    c_gamma: float

    @nn.compact
    def __call__(self, keys: jnp.ndarray, *, train: bool) -> Quantized:
        B, T, h, K = keys.shape
        assert (h, K) == (self.n_head, self.d_k), (keys.shape, self.n_head, self.d_k)
        S = self.n_code

        # Keys are RMS-normalised and scaled by K**-0.25, so their entries are of size
        # K**-0.25; the initial codewords match that scale.
        def init_sums():
            rng = self.make_rng("params")
            return jax.random.normal(rng, (h, S, K), jnp.float32) * K**-0.25

        code_sums = self.variable("codebook", "code_sums", init_sums)
        code_counts = self.variable(
            "codebook", "code_counts", lambda: jnp.ones((h, S), jnp.float32)
        )
        codebook = codebook_from_stats(code_sums.value, code_counts.value)

        keys_f32 = jax.lax.stop_gradient(keys.astype(jnp.float32))
        codes = nearest_codes(keys_f32, codebook)
        codewords = codebook[jnp.arange(h), codes]

        # Forward value exactly the codeword; gradient passed straight through to the key.
        k_hat = codewords.astype(keys.dtype) + (keys - jax.lax.stop_gradient(keys))

        commit = jnp.sum((keys.astype(jnp.float32) - codewords) ** 2, axis=-1)
        commit_loss = self.c_beta * jnp.mean(jnp.sum(commit, axis=-1))

        one_hot = jax.nn.one_hot(codes, S, dtype=jnp.float32)
        batch_counts = one_hot.sum(axis=(0, 1))
        frequencies = batch_counts / jnp.sum(batch_counts, axis=-1, keepdims=True)
        entropy = -jnp.sum(jnp.where(frequencies > 0, frequencies * jnp.log(frequencies), 0.0), -1)
        perplexity = jnp.mean(jnp.exp(entropy))
        usage = jnp.mean(batch_counts > 0)

        if train and self.is_mutable_collection("codebook") and not self.is_initializing():
            batch_sums = jnp.einsum("bths,bthk->hsk", one_hot, keys_f32, precision=HIGHEST)
            gamma = self.c_gamma
            code_counts.value = gamma * code_counts.value + (1.0 - gamma) * batch_counts
            code_sums.value = gamma * code_sums.value + (1.0 - gamma) * batch_sums

        return Quantized(k_hat, codes, codebook, commit_loss, perplexity, usage)
