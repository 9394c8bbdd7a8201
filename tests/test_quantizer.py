"""Vector quantiser: nearest codes, EMA codebook statistics, commitment loss, gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from tvq.model.quantizer import MIN_COUNT, VectorQuantizer

B, T, h, K, S = 2, 10, 2, 4, 5
BETA, GAMMA = 0.25, 0.9


def make_quantizer():
    return VectorQuantizer(n_head=h, n_code=S, d_k=K, c_beta=BETA, c_gamma=GAMMA)


def known_variables(rng):
    sums = rng.normal(size=(h, S, K)).astype(np.float32)
    counts = rng.uniform(0.5, 3.0, size=(h, S)).astype(np.float32)
    counts[0, 1] = 0.0  # a code no key has chosen: its floor count keeps it finite
    return {"codebook": {"code_sums": jnp.asarray(sums), "code_counts": jnp.asarray(counts)}}


def test_ema_update_and_commit_loss_match_numpy():
    rng = np.random.default_rng(0)
    variables = known_variables(rng)
    keys = rng.normal(size=(B, T, h, K)).astype(np.float32)

    out, updated = make_quantizer().apply(
        variables, jnp.asarray(keys), train=True, mutable=["codebook"]
    )

    sums = np.asarray(variables["codebook"]["code_sums"], np.float64)
    counts = np.asarray(variables["codebook"]["code_counts"], np.float64)
    codebook = sums / np.maximum(counts, MIN_COUNT)[..., None]
    distances = ((keys[:, :, :, None, :] - codebook[None, None]) ** 2).sum(-1)
    codes = distances.argmin(-1)
    codewords = codebook[np.arange(h), codes]
    one_hot = np.eye(S)[codes]
    batch_counts = one_hot.sum((0, 1))
    batch_sums = np.einsum("bths,bthk->hsk", one_hot, keys)
    commit = BETA * ((keys - codewords) ** 2).sum(-1).sum(-1).mean()

    np.testing.assert_array_equal(out.codes, codes)
    np.testing.assert_allclose(out.k_hat, codewords, rtol=1e-6)
    np.testing.assert_allclose(out.commit_loss, commit, rtol=1e-5)
    np.testing.assert_allclose(
        updated["codebook"]["code_counts"], GAMMA * counts + (1 - GAMMA) * batch_counts, rtol=1e-6
    )
    np.testing.assert_allclose(
        updated["codebook"]["code_sums"], GAMMA * sums + (1 - GAMMA) * batch_sums,
        rtol=1e-5, atol=1e-6,
    )


def test_codebook_unchanged_outside_training():
    rng = np.random.default_rng(1)
    variables = known_variables(rng)
    keys = jnp.asarray(rng.normal(size=(B, T, h, K)), jnp.float32)
    _, updated = make_quantizer().apply(variables, keys, train=False, mutable=["codebook"])
    for name in ("code_sums", "code_counts"):
        np.testing.assert_array_equal(updated["codebook"][name], variables["codebook"][name])


def test_straight_through_gradient_is_identity():
    rng = np.random.default_rng(2)
    variables = known_variables(rng)
    keys = jnp.asarray(rng.normal(size=(B, T, h, K)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(B, T, h, K)), jnp.float32)

    def objective(k):
        return jnp.sum(make_quantizer().apply(variables, k, train=False).k_hat * cotangent)

    np.testing.assert_allclose(jax.grad(objective)(keys), cotangent, rtol=1e-6)


def test_empty_codes_stay_finite_over_many_updates():
    # Every key sits next to code 0, so the other codes decay towards zero count.
    rng = np.random.default_rng(3)
    variables = known_variables(rng)
    target = variables["codebook"]["code_sums"][:, 0] / variables["codebook"]["code_counts"][:, 0:1]
    keys = jnp.broadcast_to(target, (B, T, h, K)) + 1e-3
    quantizer = make_quantizer()
    for _ in range(300):
        out, variables = quantizer.apply(variables, keys, train=True, mutable=["codebook"])
    assert float(variables["codebook"]["code_counts"][:, 1:].max()) < 1e-10
    for name in ("code_sums", "code_counts"):
        assert np.isfinite(np.asarray(variables["codebook"][name])).all()
    assert np.isfinite(np.asarray(out.k_hat)).all()
    np.testing.assert_allclose(out.usage, 1.0 / S, rtol=1e-6)
    np.testing.assert_allclose(out.perplexity, 1.0, rtol=1e-6)
