"""Model-level checks: VQ attention against its quadratic oracle, causality, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq import Transformer, TransformerConfig
from tvq.model.losses import cross_entropy

HEAD_TYPES = ("shga", "mqa", "mha")


def tiny_config(**changes):
    values = dict(
        n_vocab=23, d_model=16, d_k=8, n_code=6, n_layer=2, block_len=4, sequence_len=16,
        dtype="float32",
    )
    return TransformerConfig(**{**values, **changes})


def random_tokens(config, seed=0, batch=2):
    return jax.random.randint(
        jax.random.PRNGKey(seed), (batch, config.sequence_len), 0, config.n_vocab
    )


def init_variables(config, seed=1):
    """Initialise, then perturb every parameter so that zero-initialised ones matter too."""
    variables = jax.jit(Transformer(config).init)(jax.random.PRNGKey(seed), random_tokens(config))
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [
        leaf + 0.2 * jax.random.normal(key, leaf.shape)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return {**variables, "params": jax.tree_util.tree_unflatten(treedef, leaves)}


def relative_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1).max() / np.linalg.norm(b, axis=-1).min()


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_vq_logits_match_vq_quadratic(head_type):
    config = tiny_config(head_type=head_type)
    variables = init_variables(config)
    tokens = random_tokens(config)
    logits, aux = jax.jit(Transformer(config).apply)(variables, tokens)
    oracle_model = Transformer(config.replace(attn_type="vq_quadratic"))
    oracle, oracle_aux = jax.jit(oracle_model.apply)(variables, tokens)
    assert logits.shape == (2, config.sequence_len, config.n_vocab)
    assert relative_difference(logits, oracle) < 1e-5
    np.testing.assert_allclose(aux["commit_loss"], oracle_aux["commit_loss"], rtol=1e-6)


def loss_and_grads(config, variables, tokens):
    def loss_fn(params):
        logits, aux = Transformer(config).apply({**variables, "params": params}, tokens)
        return cross_entropy(logits[:, :-1], tokens[:, 1:]) + aux["commit_loss"]

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


def assert_trees_close(actual, expected, label):
    """Each leaf within 1e-5 of the expected leaf's largest magnitude, and finite."""
    expected_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    for path, leaf in jax.tree_util.tree_leaves_with_path(actual):
        reference = np.asarray(expected_leaves[path])
        assert np.isfinite(np.asarray(leaf)).all(), (label, jax.tree_util.keystr(path))
        np.testing.assert_allclose(
            leaf, reference, rtol=0, atol=1e-5 * np.abs(reference).max() + 1e-12,
            err_msg=f"{label} {jax.tree_util.keystr(path)}",
        )


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_reductions_same_logits_and_gradients(head_type):
    config = tiny_config(head_type=head_type, sequence_len=24)
    variables = init_variables(config)
    tokens = random_tokens(config)
    results = {
        reduction: loss_and_grads(config.replace(reduction_type=reduction), variables, tokens)
        for reduction in ("serial", "matmul", "assoc_scan")
    }
    loss, grads = results["serial"]
    assert np.isfinite(float(loss))
    for reduction in ("matmul", "assoc_scan"):
        other_loss, other_grads = results[reduction]
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        assert_trees_close(other_grads, grads, reduction)


@pytest.mark.parametrize("attn_type", ("vq", "vq_quadratic", "full"))
@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("position", (1, 6))
def test_causality(head_type, attn_type, position):
    config = tiny_config(head_type=head_type, attn_type=attn_type)
    variables = init_variables(config.replace(attn_type="vq"))
    tokens = random_tokens(config, batch=1)
    changed = tokens.at[0, position].set((tokens[0, position] + 1) % config.n_vocab)
    apply = jax.jit(Transformer(config).apply)
    before, _ = apply(variables, tokens)
    after, _ = apply(variables, changed)
    difference = np.abs(np.asarray(before - after)).max(axis=-1)[0]
    assert (difference[:position] == 0).all(), difference
    assert (difference[position:] > 1e-6).all(), difference


def test_straight_through_reaches_key_projection():
    config = tiny_config(c_beta=0.0)
    _, grads = loss_and_grads(config, init_variables(config), random_tokens(config))
    for sublayer in ("attn_0", "attn_1"):
        key_grad = np.asarray(grads["layers"][sublayer]["k_proj"]["kernel"])
        assert np.abs(key_grad).max() > 1e-6, sublayer


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_remat_policies_same_gradients(head_type):
    config = tiny_config(head_type=head_type)
    variables = init_variables(config)
    tokens = random_tokens(config)
    _, expected = loss_and_grads(config.replace(remat="none"), variables, tokens)
    for remat in ("full", "save_dots"):
        _, grads = loss_and_grads(config.replace(remat=remat), variables, tokens)
        assert_trees_close(grads, expected, remat)


def test_training_mode_options():
    config = tiny_config(
        pe_abs=True, e_tie=True, e_preln=True, e_scale=0.5,
        p_dropsin=0.1, p_dropres=0.2, p_droplyr=0.3,
    )
    variables = init_variables(config)
    tokens = random_tokens(config)
    model = Transformer(config)
    (train_logits, aux), updated = model.apply(
        variables, tokens, train=True, mutable=["codebook"], rngs={"dropout": jax.random.PRNGKey(5)}
    )
    eval_logits, _ = model.apply(variables, tokens)

    assert "unembed" not in variables["params"]
    assert "pe_abs_scale" in variables["params"]
    assert np.isfinite(np.asarray(train_logits)).all()
    assert np.abs(np.asarray(train_logits - eval_logits)).max() > 1e-4
    assert aux["codebook_perplexity"].shape == (config.n_layer, 2)
    assert aux["codebook_usage"].shape == (config.n_layer, 2)
    counts = updated["codebook"]["layers"]["attn_0"]["quantizer"]["code_counts"]
    previous = variables["codebook"]["layers"]["attn_0"]["quantizer"]["code_counts"]
    assert np.abs(np.asarray(counts - previous)).max() > 0
    # Codebook statistics are not parameters, so an optimiser never receives them.
    assert not any("code_" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"]))


@pytest.mark.slow
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bfloat16_long_sequence_finite(head_type):
    config = TransformerConfig(
        n_vocab=259, d_model=32, d_k=16, n_code=32, n_layer=2, block_len=256,
        sequence_len=4096, head_type=head_type, dtype="bfloat16",
    )
    tokens = random_tokens(config, batch=1)
    model = Transformer(config)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)

    def loss_fn(params):
        (logits, aux), _ = model.apply(
            {**variables, "params": params}, tokens, train=True, mutable=["codebook"],
            rngs={"dropout": jax.random.PRNGKey(1)},
        )
        return cross_entropy(logits[:, :-1], tokens[:, 1:]) + aux["commit_loss"], logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert np.isfinite(np.asarray(logits)).all()
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), jax.tree_util.keystr(path)
