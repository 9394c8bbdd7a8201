"""Metric arithmetic on losses and counts whose results are known."""

import math

import pytest

from tvq.evaluation.metrics import bits_per_unit, perplexity


def test_uniform_bytes_cost_eight_bits():
    n_bytes = 1000
    total = n_bytes * math.log(256)
    assert bits_per_unit(total, n_bytes) == pytest.approx(8.0)


def test_bits_per_dimension_of_image():
    # 12,288 subpixels per 64x64x3 image, each coded with 3.16 bits.
    subpixels = 3 * 12_288
    total = 3.16 * math.log(2) * subpixels
    assert bits_per_unit(total, subpixels) == pytest.approx(3.16)


def test_word_and_token_perplexity():
    # 1.3 tokens per word at 3.0 nats per token.
    tokens, words = 13_000, 10_000
    total = 3.0 * tokens
    assert perplexity(total, tokens) == pytest.approx(math.exp(3.0))
    assert perplexity(total, words) == pytest.approx(math.exp(3.9))


@pytest.mark.parametrize(
    "total, count, message",
    [
        (1.0, 0, "must be positive"),
        (float("nan"), 5, "finite, non-negative"),
        (-1.0, 5, "finite, non-negative"),
    ],
)
def test_invalid_inputs(total, count, message):
    with pytest.raises(ValueError, match=message):
        bits_per_unit(total, count)
    with pytest.raises(ValueError, match=message):
        perplexity(total, count)
