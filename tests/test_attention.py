"""Attention kernels against an independent float64 reference.

The reference is the definition itself: causal softmax over all keys with score
(q_i + u) . k_j + (q_i + w) . r(i - j), the position term only for 0 <= i - j <= L.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.model.attention import full_attention, quadratic_attention, vq_attention
from tvq.model.cache import REDUCTIONS
from tvq.model.quantizer import nearest_codes

# (h, G, K, V): kv heads, query heads per kv head, key width, value width.
HEAD_SHAPES = {"shga": (1, 1, 8, 16), "mqa": (1, 3, 8, 8), "mha": (3, 1, 8, 8)}
# (T, L): three blocks, block lengths that are not powers of two, and many blocks.
LENGTHS = [(12, 4), (15, 5), (21, 7), (42, 6)]
TOLERANCE = 1e-5


def reference_attention(q, k, v, u, w, r, block_len):
    """Causal softmax attention in float64, one (batch, head) score matrix at a time."""
    q, k, v, u, w, r = (np.asarray(a, np.float64) for a in (q, k, v, u, w, r))
    B, T, h, G, K = q.shape
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    out = np.zeros((B, T, h, G, v.shape[-1]))
    for b, head, group in itertools.product(range(B), range(h), range(G)):
        query = q[b, :, head, group]
        scores = (query + u[head, group]) @ k[b, :, head].T
        by_distance = (query + w[head, group]) @ r[:, head].T  # [T, L + 1]
        for i, j in np.argwhere((distance >= 0) & (distance <= block_len)):
            scores[i, j] += by_distance[i, i - j]
        scores[distance < 0] = -np.inf
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[b, :, head, group] = weights @ v[b, :, head]
    return out


def max_relative_error(actual, expected):
    """Largest per-position relative error ||a_i - e_i|| / ||e_i|| over all positions."""
    actual = np.asarray(actual, np.float64).reshape(*expected.shape[:2], -1)
    expected = expected.reshape(*expected.shape[:2], -1)
    error = np.linalg.norm(actual - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    return error.max()


def random_inputs(seed, T, L, h, G, K, V, S=6, B=2):
    """Queries, quantised keys from a random codebook, values and bias parameters."""
    rng = np.random.default_rng(seed)
    scale = K**-0.25
    q = rng.normal(size=(B, T, h, G, K)) * scale
    codebook = rng.normal(size=(h, S, K)) * scale
    keys = rng.normal(size=(B, T, h, K)) * scale
    z = nearest_codes(jnp.asarray(keys, jnp.float32), jnp.asarray(codebook, jnp.float32))
    z = np.asarray(z)
    k_hat = codebook[np.arange(h), z]
    v = rng.normal(size=(B, T, h, V))
    u, w = rng.normal(size=(2, h, G, K)) * 0.5
    r = rng.normal(size=(L + 1, h, K)) * 0.5
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return dict(
        q=as32(q), k_hat=as32(k_hat), keys=as32(keys), v=as32(v), z=jnp.asarray(z),
        codebook=as32(codebook), u=as32(u), w=as32(w), r=as32(r),
    )


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
@pytest.mark.parametrize("head_type", sorted(HEAD_SHAPES))
@pytest.mark.parametrize("T,L", LENGTHS)
def test_vq_attention_matches_reference(T, L, head_type, reduction):
    x = random_inputs(T * 100 + L, T, L, *HEAD_SHAPES[head_type])
    out = vq_attention(
        x["q"], x["k_hat"], x["v"], x["z"], x["codebook"], x["u"], x["w"], x["r"],
        block_len=L, reduction=reduction,
    )
    expected = reference_attention(x["q"], x["k_hat"], x["v"], x["u"], x["w"], x["r"], L)
    assert out.shape == expected.shape
    assert max_relative_error(out, expected) < TOLERANCE


@pytest.mark.parametrize("head_type", sorted(HEAD_SHAPES))
@pytest.mark.parametrize("T,L", LENGTHS)
def test_quadratic_attention_matches_reference(T, L, head_type):
    x = random_inputs(T * 100 + L, T, L, *HEAD_SHAPES[head_type])
    out = quadratic_attention(x["q"], x["k_hat"], x["v"], x["u"], x["w"], x["r"], block_len=L)
    expected = reference_attention(x["q"], x["k_hat"], x["v"], x["u"], x["w"], x["r"], L)
    assert max_relative_error(out, expected) < TOLERANCE


@pytest.mark.parametrize("head_type", sorted(HEAD_SHAPES))
@pytest.mark.parametrize("T,L", LENGTHS)
def test_full_attention_matches_reference(T, L, head_type):
    # The dense baseline attends to the unquantised keys.
    x = random_inputs(T * 100 + L, T, L, *HEAD_SHAPES[head_type])
    out = full_attention(x["q"], x["keys"], x["v"], x["u"], x["w"], x["r"], block_len=L)
    expected = reference_attention(x["q"], x["keys"], x["v"], x["u"], x["w"], x["r"], L)
    assert max_relative_error(out, expected) < TOLERANCE


def test_reference_detects_wrong_window():
    # Guards the reference itself: a position window of L - 1 must not pass for L.
    x = random_inputs(0, 12, 4, *HEAD_SHAPES["mha"])
    narrow = reference_attention(x["q"], x["k_hat"], x["v"], x["u"], x["w"], x["r"][:-1], 3)
    out = vq_attention(
        x["q"], x["k_hat"], x["v"], x["z"], x["codebook"], x["u"], x["w"], x["r"],
        block_len=4, reduction="serial",
    )
    assert max_relative_error(out, narrow) > 1e-3


@pytest.mark.parametrize("head_type", sorted(HEAD_SHAPES))
def test_reductions_same_gradients(head_type):
    T, L = 24, 4
    x = random_inputs(7, T, L, *HEAD_SHAPES[head_type])
    cotangent = jax.random.normal(jax.random.PRNGKey(0), x["q"].shape[:-1] + x["v"].shape[-1:])
    differentiable = ("q", "k_hat", "v", "u", "w", "r")

    def objective(args, reduction):
        out = vq_attention(
            args["q"], args["k_hat"], args["v"], x["z"], x["codebook"], args["u"], args["w"],
            args["r"], block_len=L, reduction=reduction,
        )
        return jnp.sum(out * cotangent)

    args = {name: x[name] for name in differentiable}
    grads = {red: jax.grad(objective)(args, red) for red in sorted(REDUCTIONS)}
    for reduction in ("matmul", "assoc_scan"):
        for name in differentiable:
            np.testing.assert_allclose(
                grads[reduction][name], grads["serial"][name], rtol=1e-5, atol=1e-6,
                err_msg=f"{reduction} gradient of {name}",
            )
    assert np.abs(np.asarray(grads["serial"]["v"])).max() > 0
