"""Optimiser chain and learning-rate schedules against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer

PEAK, WARMUP, TOTAL = 1e-3, 10, 110


@pytest.mark.parametrize("kind", ["cosine", "linear", "inv_sqrt"])
def test_schedule_warmup_and_floor(kind):
    schedule = learning_rate_schedule(kind, PEAK, WARMUP, TOTAL)
    assert float(schedule(0)) == pytest.approx(PEAK / WARMUP)
    assert float(schedule(WARMUP - 1)) == pytest.approx(PEAK)
    assert float(schedule(WARMUP)) == pytest.approx(PEAK)
    values = np.array([float(schedule(step)) for step in range(WARMUP, 100 * TOTAL, 7)])
    assert (np.diff(values) <= 1e-12).all()
    assert values.min() == pytest.approx(0.1 * PEAK, rel=1e-5)


def test_schedule_midpoints():
    middle = WARMUP + (TOTAL - WARMUP) // 2
    cosine = learning_rate_schedule("cosine", PEAK, WARMUP, TOTAL)
    linear = learning_rate_schedule("linear", PEAK, WARMUP, TOTAL)
    inv_sqrt = learning_rate_schedule("inv_sqrt", PEAK, WARMUP, TOTAL)
    assert float(cosine(middle)) == pytest.approx(PEAK * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(linear(middle)) == pytest.approx(PEAK * (1 - 0.9 * 0.5), rel=1e-5)
    assert float(inv_sqrt(40)) == pytest.approx(PEAK * math.sqrt(WARMUP / 40), rel=1e-5)
    assert float(cosine(TOTAL)) == pytest.approx(0.1 * PEAK, rel=1e-5)


def params_and_grads():
    params = {
        "layers": {"q_proj": {"kernel": jnp.full((2, 3, 4), 2.0)}, "u": jnp.full((2, 4), 2.0)},
        "embed": {"embedding": jnp.full((5, 4), 2.0)},
    }
    grads = jax.tree_util.tree_map(
        lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) / 10, params
    )
    return params, grads


def test_decay_mask_selects_matrices():
    params, _ = params_and_grads()
    mask = decay_mask(params)
    assert mask["layers"]["q_proj"]["kernel"] is True
    assert mask["embed"]["embedding"] is True
    assert mask["layers"]["u"] is False


@pytest.mark.parametrize("peak", [1e-3, 0.5])
def test_weight_decay_not_scaled_by_learning_rate(peak):
    params, grads = params_and_grads()
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, grads)
    schedule = learning_rate_schedule("cosine", peak, WARMUP, TOTAL)
    optimizer = make_optimizer("adamw", schedule, weight_decay=2e-4)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["layers"]["q_proj"]["kernel"], -2e-4 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["embed"]["embedding"], -2e-4 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["layers"]["u"], 0.0)


def test_adamw_first_step_matches_formula():
    params, grads = params_and_grads()
    schedule = learning_rate_schedule("cosine", PEAK, WARMUP, TOTAL)
    optimizer = make_optimizer("adamw", schedule)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    g = np.asarray(grads["layers"]["u"], np.float64)
    m_hat = (0.1 * g) / (1 - 0.9)
    v_hat = (0.02 * g**2) / (1 - 0.98)
    expected = -(PEAK / WARMUP) * m_hat / (np.sqrt(v_hat) + 1e-9)
    np.testing.assert_allclose(updates["layers"]["u"], expected, rtol=1e-5)


def test_clipping_scales_to_global_norm():
    # Adam's update barely depends on the gradient's scale, except through eps; a large
    # eps makes the scale visible, so the clipping shows in the update.
    params, grads = params_and_grads()
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
    assert norm > 0.5
    scaled = jax.tree_util.tree_map(lambda g: g * (0.5 / norm), grads)
    schedule = learning_rate_schedule("cosine", PEAK, WARMUP, TOTAL)
    clipped = make_optimizer("adamw", schedule, grad_clip=0.5, eps=1.0)
    plain = make_optimizer("adamw", schedule, eps=1.0)

    clipped_updates, _ = clipped.update(grads, clipped.init(params), params)
    scaled_updates, _ = plain.update(scaled, plain.init(params), params)
    plain_updates, _ = plain.update(grads, plain.init(params), params)

    for clipped_leaf, scaled_leaf, plain_leaf in zip(
        jax.tree_util.tree_leaves(clipped_updates),
        jax.tree_util.tree_leaves(scaled_updates),
        jax.tree_util.tree_leaves(plain_updates),
        strict=True,
    ):
        np.testing.assert_allclose(clipped_leaf, scaled_leaf, rtol=1e-5)
        assert np.abs(np.asarray(plain_leaf)).max() > 1.5 * np.abs(np.asarray(clipped_leaf)).max()


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_each_optimizer_reduces_quadratic(name):
    target = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    params = {"dense": {"kernel": jnp.zeros((3, 4))}}
    schedule = learning_rate_schedule("cosine", 0.05, 5, 200)
    optimizer = make_optimizer(name, schedule, grad_clip=1.0)
    state = optimizer.init(params)

    def loss(p):
        return jnp.sum((p["dense"]["kernel"] - target) ** 2)

    start = float(loss(params))
    for _ in range(200):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
    assert float(loss(params)) < 0.1 * start


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate_schedule("step", PEAK, WARMUP, TOTAL)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", lambda step: 1.0)
