"""Batches in a deterministic, resumable order: row numbers as a pure function of (seed, step)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from hamjax.data.packing import PackedRows
from hamjax.ops.validation import check_nonnegative_int, check_positive_int


@functools.lru_cache(maxsize=4)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """[N] read-only row order of one epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    order.flags.writeable = False
    return order


def batch_indices(n_rows: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The row numbers [B] int64 of training step `step`'s batch out of n_rows rows: a pure function
    of its arguments, so resuming from a checkpoint needs only the step.

    Example p = step * B + i is row permutation_e[p % N] of epoch e = p // N; every epoch visits every
    row once, and a batch may straddle two epochs.
    """
    check_positive_int("n_rows", n_rows)
    check_nonnegative_int("step", step)
    check_positive_int("batch_size", batch_size)
    check_nonnegative_int("seed", seed)
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // n_rows
    index = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        index[where] = _permutation(n_rows, seed, int(epoch))[positions[where] % n_rows]
    return index


def batch_at(rows: PackedRows, step: int, batch_size: int, seed: int) -> PackedRows:
    """[N, L] rows -> batch [B, L] of training step `step` (the rows `batch_indices` names)."""
    index = batch_indices(len(rows.tokens), step, batch_size, seed)
    return PackedRows(rows.tokens[index], rows.segment_ids[index])


def sequential_indices(n_rows: int, batch_size: int) -> Iterator[np.ndarray]:
    """The row numbers [B] int64 of batches of n_rows rows in row order; the last batch holds the
    remaining n_rows mod B rows, if any."""
    check_positive_int("batch_size", batch_size)
    return (np.arange(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size))
