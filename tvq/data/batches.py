"""Batches for training and evaluation, as int32 arrays of shape [B, T].

Both iterators use the same layout: `targets` are T consecutive tokens, `inputs` are
the end-of-sequence id followed by targets[:-1], and `loss_mask` is true exactly on
real (not padding) targets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import grain
import numpy as np

from tvq.data.errors import DataError
from tvq.data.vocab import EOS_ID, PAD_ID

Batch = dict[str, np.ndarray]


def _check_length(tokens: np.ndarray, sequence_len: int, name: str) -> None:
    if len(tokens) < sequence_len:
        raise DataError(
            f"{name} contains {len(tokens):,} tokens, fewer than one sequence of "
            f"{sequence_len:,}; lower sequence_len or prepare more data"
        )


def _with_inputs(targets: np.ndarray, loss_mask: np.ndarray) -> Batch:
    inputs = np.empty_like(targets)
    inputs[:, 0] = EOS_ID
    inputs[:, 1:] = targets[:, :-1]
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def train_batch(
    tokens: np.ndarray,
    step: int,
    *,
    seed: int,
    batch_size: int,
    sequence_len: int,
    rows: slice | None = None,
) -> Batch:
    """Return the training batch of `step`: random windows drawn by a generator keyed on
    (seed, step), so the batch does not depend on which steps ran before.

    `rows` selects the sequences one process loads of the batch_size in the global batch;
    every process draws the same windows, so the parts fit together.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - sequence_len + 1, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    targets = np.stack([np.asarray(tokens[s : s + sequence_len]) for s in starts])
    targets = targets.astype(np.int32)
    return _with_inputs(targets, np.ones(targets.shape, bool))


def train_batches(
    tokens: np.ndarray,
    *,
    seed: int,
    batch_size: int,
    sequence_len: int,
    start_step: int = 0,
    num_steps: int,
    prefetch: int = 4,
    rows: slice | None = None,
) -> Iterator[Batch]:
    """Yield the training batches of steps start_step .. num_steps - 1 (only `rows` of
    each, if given).

    Batches are assembled ahead of the consumer by background threads (grain), and
    resuming at start_step k yields exactly the batches of an uninterrupted run.
    """
    _check_length(tokens, sequence_len, "the train split")
    make_batch = functools.partial(
        train_batch, tokens, seed=seed, batch_size=batch_size, sequence_len=sequence_len,
        rows=rows,
    )
    dataset = grain.MapDataset.range(start_step, num_steps).map(make_batch)
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def eval_batch_count(n_tokens: int, *, batch_size: int, sequence_len: int) -> int:
    return math.ceil(math.ceil(n_tokens / sequence_len) / batch_size)


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    sequence_len: int,
    name: str = "the split",
    rows: slice | None = None,
) -> Iterator[Batch]:
    """Yield the split in order, cut into sequences and batches, padding the last ones.

    Every token of the split is a target with loss_mask true exactly once. `rows`
    selects the sequences of each batch that one process loads, and only their tokens
    are read.
    """
    _check_length(tokens, sequence_len, name)
    rows = slice(0, batch_size) if rows is None else rows
    n_tokens = len(tokens)
    n_batches = eval_batch_count(n_tokens, batch_size=batch_size, sequence_len=sequence_len)
    n_rows = rows.stop - rows.start
    tokens_per_part = n_rows * sequence_len
    for index in range(n_batches):
        start = (index * batch_size + rows.start) * sequence_len
        chunk = np.asarray(tokens[start : start + tokens_per_part]).astype(np.int32)
        targets = np.full(tokens_per_part, PAD_ID, np.int32)
        targets[: len(chunk)] = chunk
        loss_mask = np.arange(tokens_per_part) < len(chunk)
        shape = (n_rows, sequence_len)
        yield _with_inputs(targets.reshape(shape), loss_mask.reshape(shape))
