"""Batches in a deterministic, resumable order, and the whole text pipeline (`prepare_corpus`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from hamjax.data.corpus import load_documents
from hamjax.data.packing import PackedRows, pack_documents, split_documents
from hamjax.data.tokenizers import Tokenizer
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


class Corpus(NamedTuple):
    """Packed train and validation rows [N, seq_len + 1], split by document."""

    train: PackedRows
    validation: PackedRows
    bytes_per_token: float  # UTF-8 bytes / tokens over all documents: converts nats/token to bits/byte
    vocab_size: int


def _pack_split(split: str, documents: list[np.ndarray], row_length: int) -> PackedRows:
    n_tokens = sum(len(doc) for doc in documents)
    if n_tokens < row_length:
        raise ValueError(
            f"the {split} split has {n_tokens} tokens, fewer than one row of seq_len + 1 = {row_length}: "
            f"use a larger validation_fraction or a smaller seq_len"
        )
    return pack_documents(documents, row_length)


def prepare_corpus(
    source: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    validation_fraction: float,
    text_field: str = "text",
) -> Corpus:
    """Load `source` (see `load_documents`), split it by document, tokenize and pack each split into
    rows of seq_len + 1 tokens: inputs row[:, :-1], targets row[:, 1:].
    """
    check_positive_int("seq_len", seq_len)
    texts = load_documents(source, text_field)["text"][:]
    train_index, validation_index = split_documents(len(texts), validation_fraction)
    tokens = tokenizer.encode_batch(texts)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return Corpus(
        train=_pack_split("train", [tokens[i] for i in train_index], seq_len + 1),
        validation=_pack_split("validation", [tokens[i] for i in validation_index], seq_len + 1),
        bytes_per_token=n_bytes / sum(len(doc) for doc in tokens),
        vocab_size=tokenizer.vocab_size,
    )
