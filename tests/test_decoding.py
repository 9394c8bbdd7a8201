"""Incremental decoding: token-by-token logits equal one forward pass; the state is fixed.

The reference is the model's own parallel forward pass over the whole sequence, whose
attention kernels are checked against quadratic float64 attention in test_attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.model.config import TransformerConfig
from tvq.model.transformer import Transformer
from tvq.sampling.decoder import Decoder

# Four-token blocks over 32 tokens: eight blocks, so decoding crosses seven block
# boundaries and the compressed cache holds up to six blocks.
SMALL = dict(
    n_vocab=23, d_model=32, d_k=16, n_code=8, n_layer=2, block_len=4, sequence_len=32,
    dtype="float32", remat="none", pe_abs=True,
)


def make_variables(config, seed=0):
    """Random parameters and codebook, with a non-zero absolute position scale so that
    the decoding path of the position embedding is exercised too."""
    tokens = jnp.zeros((1, config.sequence_len), jnp.int32)
    variables = Transformer(config).init(jax.random.PRNGKey(seed), tokens)
    params = dict(variables["params"])
    params["pe_abs_scale"] = jnp.asarray(0.7, jnp.float32)
    return {"params": params, "codebook": variables.get("codebook", {})}


def random_tokens(config, batch_size, length, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch_size, length), 0, config.n_vocab)


def relative_error(actual, expected):
    return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


def attention_states(cache):
    """The per-sublayer states of a decoding cache, keyed by sublayer name."""
    return {name: state for name, state in cache["layers"].items()}


@pytest.mark.parametrize("attn_type", ["vq", "full"])
@pytest.mark.parametrize("head_type", ["shga", "mqa", "mha"])
def test_incremental_logits_equal_forward_pass(attn_type, head_type):
    config = TransformerConfig(**SMALL, attn_type=attn_type, head_type=head_type)
    variables = make_variables(config)
    tokens = random_tokens(config, batch_size=2, length=config.sequence_len)
    expected, _ = Transformer(config).apply(variables, tokens)

    decoder = Decoder(config, variables, batch_size=2, capacity=config.sequence_len)
    # Two calls of different lengths, the first ending inside a block.
    cache, first = decoder.consume_logits(decoder.start(), tokens[:, :13])
    cache, rest = decoder.consume_logits(cache, tokens[:, 13:])
    actual = jnp.concatenate([first, rest], axis=1)

    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-4
    if attn_type == "vq":
        # Blocks 0 .. 5 entered the cache, 4 tokens each, for every head.
        for state in attention_states(cache).values():
            np.testing.assert_array_equal(state["counts"].sum(-1), 24.0)


def test_vq_decoding_uses_the_cache():
    """With the cache's contribution removed, the late logits no longer match, so the
    exactness test above cannot pass without it."""
    config = TransformerConfig(**SMALL, attn_type="vq", head_type="mqa")
    variables = make_variables(config)
    tokens = random_tokens(config, batch_size=1, length=config.sequence_len)
    expected, _ = Transformer(config).apply(variables, tokens)

    decoder = Decoder(config, variables, batch_size=1, capacity=config.sequence_len)
    cache, _ = decoder.consume(decoder.start(), tokens[:, :24])
    emptied = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "counts" in jax.tree_util.keystr(path) else x, cache
    )
    _, late = decoder.consume_logits(emptied, tokens[:, 24:])
    assert relative_error(late, expected[:, 24:]) > 1e-2


@pytest.mark.parametrize("attn_type", ["vq", "full"])
def test_prompt_longer_than_sequence_len(attn_type):
    """Decoding past sequence_len equals a forward pass of a model configured for the
    longer length: the parameters do not depend on sequence_len."""
    config = TransformerConfig(**SMALL, attn_type=attn_type, head_type="mha")
    variables = make_variables(config)
    long_config = config.replace(sequence_len=3 * config.sequence_len)
    tokens = random_tokens(config, batch_size=1, length=long_config.sequence_len, seed=5)
    expected, _ = Transformer(long_config).apply(variables, tokens)

    decoder = Decoder(config, variables, batch_size=1, capacity=long_config.sequence_len)
    _, actual = decoder.consume_logits(decoder.start(), tokens)
    assert relative_error(actual, expected) < 1e-4


def state_shapes(cache):
    return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), cache)


@pytest.mark.parametrize("head_type", ["shga", "mqa", "mha"])
def test_vq_state_size_does_not_grow(head_type):
    config = TransformerConfig(**SMALL, attn_type="vq", head_type=head_type)
    variables = make_variables(config)
    tokens = random_tokens(config, batch_size=2, length=100)
    decoder = Decoder(config, variables, batch_size=2, capacity=8)

    empty = decoder.start()
    after_some, _ = decoder.consume(empty, tokens[:, :5])
    after_many, _ = decoder.consume(after_some, tokens[:, 5:])
    assert state_shapes(after_some) == state_shapes(empty)
    assert state_shapes(after_many) == state_shapes(empty)
    # The capacity only sizes a full-attention cache.
    other = Decoder(config, variables, batch_size=2, capacity=10_000).start()
    assert state_shapes(other) == state_shapes(empty)
    for state in attention_states(after_many).values():
        np.testing.assert_array_equal(state["position"], 100)


def test_full_state_grows_with_capacity():
    config = TransformerConfig(**SMALL, attn_type="full", head_type="mqa")
    variables = make_variables(config)
    small = Decoder(config, variables, batch_size=1, capacity=16).start()
    large = Decoder(config, variables, batch_size=1, capacity=64).start()
    assert small["layers"]["attn"]["k_cache"].shape[-2] == 16
    assert large["layers"]["attn"]["k_cache"].shape[-2] == 64


def test_generation_does_not_depend_on_chunking():
    config = TransformerConfig(**SMALL, attn_type="vq", head_type="shga")
    decoder = Decoder(config, make_variables(config), batch_size=3, capacity=64)
    cache, logits = decoder.consume(decoder.start(), random_tokens(config, 3, 6))
    key = jax.random.PRNGKey(4)

    _, _, whole = decoder.generate(cache, logits, key, 0, 20, top_k=5)
    cache_1, logits_1, first = decoder.generate(cache, logits, key, 0, 7, top_k=5)
    _, _, second = decoder.generate(cache_1, logits_1, key, 7, 13, top_k=5)
    np.testing.assert_array_equal(whole, np.concatenate([first, second], axis=1))
    # Three samples of one prompt draw different tokens.
    assert len({tuple(row) for row in np.asarray(whole)}) == 3


def test_bfloat16_decoding_stays_close():
    """In bfloat16 the two orders of summation differ, but only by rounding."""
    config = TransformerConfig(**{**SMALL, "dtype": "bfloat16"}, attn_type="vq", head_type="mqa")
    variables = make_variables(config)
    tokens = random_tokens(config, batch_size=1, length=config.sequence_len)
    expected, _ = Transformer(config).apply(variables, tokens)
    decoder = Decoder(config, variables, batch_size=1, capacity=config.sequence_len)
    _, actual = decoder.consume_logits(decoder.start(), tokens)
    assert relative_error(actual, expected) < 5e-2
