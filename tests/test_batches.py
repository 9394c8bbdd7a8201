"""Batch iterators: every evaluation token scored once, training batches keyed on step."""

import numpy as np
import pytest

from tvq.data.batches import eval_batches, train_batch, train_batches
from tvq.data.errors import DataError
from tvq.data.vocab import EOS_ID, PAD_ID


@pytest.mark.parametrize("n_tokens", [64, 65, 96, 127, 128, 129, 200])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_scores_every_token_once(n_tokens, batch_size):
    T = 16
    tokens = (np.arange(n_tokens) % 250 + 3).astype(np.uint16)
    batches = list(eval_batches(tokens, batch_size=batch_size, sequence_len=T))

    mask = np.concatenate([b["loss_mask"].reshape(-1) for b in batches])
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    assert mask.sum() == n_tokens
    np.testing.assert_array_equal(targets[mask], tokens)
    assert (targets[~mask] == PAD_ID).all()
    for batch in batches:
        assert batch["inputs"].shape == (batch_size, T)
        assert batch["inputs"].dtype == np.int32
        assert (batch["inputs"][:, 0] == EOS_ID).all()
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_split_shorter_than_sequence():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match="contains 10 tokens, fewer than one sequence of 16"):
        list(eval_batches(tokens, batch_size=2, sequence_len=16))
    with pytest.raises(DataError, match="fewer than one sequence"):
        train_batches(tokens, seed=0, batch_size=2, sequence_len=16, num_steps=3)


def test_train_batch_same_after_resume():
    tokens = (np.arange(5000) % 250 + 3).astype(np.uint16)
    settings = dict(seed=7, batch_size=4, sequence_len=32)
    first = list(train_batches(tokens, num_steps=6, **settings))
    second = list(train_batches(tokens, num_steps=6, **settings))
    resumed = list(train_batches(tokens, start_step=4, num_steps=6, **settings))

    assert len(first) == 6
    assert len(resumed) == 2
    for step in range(6):
        for key in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(first[step][key], second[step][key])
    for offset, step in enumerate((4, 5)):
        np.testing.assert_array_equal(resumed[offset]["targets"], first[step]["targets"])
        np.testing.assert_array_equal(
            train_batch(tokens, step, **settings)["targets"], first[step]["targets"]
        )
    assert not np.array_equal(first[0]["targets"], first[1]["targets"])
    other_seed = train_batch(tokens, 0, seed=8, batch_size=4, sequence_len=32)
    assert not np.array_equal(other_seed["targets"], first[0]["targets"])


def test_train_windows_are_contiguous():
    tokens = (np.arange(1000) + 3).astype(np.uint16)
    batch = train_batch(tokens, 3, seed=0, batch_size=5, sequence_len=20)
    assert batch["targets"].shape == (5, 20)
    assert (np.diff(batch["targets"], axis=1) == 1).all()
    assert batch["loss_mask"].all()
    assert (batch["inputs"][:, 0] == EOS_ID).all()
